"""The posts table: what is written is what is read back, the CSV export, and the JSON form of a row."""

import io
import json
from datetime import UTC, datetime

import pytest

from illust2vec.errors import UserError
from illust2vec.formats.posts import (
    FAILED,
    PARTS,
    SCHEMA,
    STATE,
    export_csv,
    make_row,
    part_files,
    post_files,
    read_posts,
    record_from_json,
    record_to_json,
    write_posts,
)


def rows() -> list[dict]:
    """Three posts: tagged in every category, with empty tag lists and unknown values, and a failed one."""
    full = {
        "id": 7,
        "md5": "0123456789abcdef0123456789abcdef",
        "file_url": "https://board.example/data/x.png",
        "file_ext": "png",
        "width": 800,
        "height": 1200,
        "rating": "s",
        "score": 12,
        "created_at": datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        "tags_general": ("1girl", "long_hair", "smile"),
        "tags_character": ("hatsune_miku",),
        "tags_copyright": ("vocaloid",),
        "tags_artist": ("someone",),
        "tags_meta": ("highres",),
        "site": "danbooru",
        "parent_id": 3,
        "source": "https://example.com/src",
    }
    bare = {"id": 9, "md5": None, "file_url": None, "file_ext": "", "width": 0, "height": 0, "rating": "", "score": 0}
    bare |= {"created_at": None, "site": "gelbooru", "parent_id": None}  # no tags at all: every list empty
    return [
        make_row(full, "ok", shard="images/000000.tar"),
        make_row(bare, "no_file", "the board shows no file"),
        make_row({**full, "id": 8, "tags_general": []}, "failed", "md5 mismatch"),
    ]


def test_make_row_has_the_schemas_columns_and_lists():
    row = rows()[1]
    assert list(row) == SCHEMA.names
    assert all(row[f"tags_{c}"] == [] for c in ("general", "character", "copyright", "artist", "meta"))
    assert (row["status"], row["reason"], row["shard"], row["source"]) == (
        "no_file",
        "the board shows no file",
        None,
        None,
    )
    assert rows()[0]["tags_general"] == ["1girl", "long_hair", "smile"]


def test_write_then_read_back_identical(tmp_path):
    written = rows()
    (tmp_path / "posts").mkdir()
    for i, part in enumerate([written[:2], written[2:]]):
        write_posts(tmp_path / PARTS.format(index=i), part)
    assert [p.name for p in part_files(tmp_path)] == ["000000.parquet", "000001.parquet"]
    assert not list(tmp_path.glob("**/*.tmp"))
    back = read_posts([tmp_path]).to_pylist()
    assert back == written
    assert read_posts([tmp_path], ["id", "tags_general"]).to_pylist() == [
        {"id": r["id"], "tags_general": r["tags_general"]} for r in written
    ]


def test_failed_posts_are_read_but_are_not_a_part(tmp_path):
    (tmp_path / "posts").mkdir()
    write_posts(tmp_path / PARTS.format(index=0), rows()[:1])
    write_posts(tmp_path / FAILED, rows()[2:])
    assert part_files(tmp_path) == [tmp_path / PARTS.format(index=0)]
    assert sorted(read_posts([tmp_path], ["id"]).column("id").to_pylist()) == [7, 8]


def test_a_directory_without_posts(tmp_path):
    with pytest.raises(UserError, match="no posts/\\*.parquet"):
        post_files([tmp_path])
    (tmp_path / STATE).touch()  # a crawl that has listed nothing yet
    assert post_files([tmp_path]) == []
    assert read_posts([tmp_path], ["id", "status"]).num_rows == 0


def test_record_json_round_trip():
    for row in rows():
        as_json = record_to_json(row)
        assert record_from_json(json.loads(json.dumps(as_json))) == row
    assert record_to_json(rows()[0])["created_at"] == "2024-05-01T12:30:15.123456+00:00"


def test_export_csv_writes_the_seeds_columns_in_id_order(tmp_path):
    (tmp_path / "posts").mkdir()
    write_posts(tmp_path / PARTS.format(index=0), rows())
    buf = io.StringIO()
    assert export_csv([tmp_path], buf) == 3
    assert buf.getvalue().splitlines() == [
        "id,md5,rating,general,character,copyright,artist,meta",
        "7,0123456789abcdef0123456789abcdef,s,1girl long_hair smile,hatsune_miku,vocaloid,someone,highres",
        "8,0123456789abcdef0123456789abcdef,s,,hatsune_miku,vocaloid,someone,highres",
        "9,,,,,,,",
    ]


def test_posts_read_from_object_storage_as_from_a_directory(bucket, tmp_path):
    from illust2vec.util import storage

    written = rows()
    (tmp_path / "posts").mkdir()
    write_posts(tmp_path / PARTS.format(index=0), written[:2])
    write_posts(tmp_path / FAILED, written[2:])
    storage.upload_tree(tmp_path, f"{bucket}/crawl")
    assert part_files(f"{bucket}/crawl") == [f"{bucket}/crawl/{PARTS.format(index=0)}"]
    assert read_posts([f"{bucket}/crawl"]).to_pylist() == read_posts([tmp_path]).to_pylist() == written
    out = io.StringIO()
    assert export_csv([f"{bucket}/crawl"], out) == 3
    with pytest.raises(UserError, match=rf"^{bucket}/empty: no posts/\*.parquet here"):
        post_files([f"{bucket}/empty"])
