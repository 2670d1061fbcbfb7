"""The catalogue of `i2v tag`: rows per destination written, read back, forgotten; a dot-file; a folder where it
cannot be written is one error; another version is refused."""

import sqlite3

import pytest

from illust2vec.formats.catalogue import NAME, Catalogue, CatalogueError, Entry, file_hash


def test_round_trip_per_destination(tmp_path):
    (tmp_path / "a.png").write_bytes(b"abc")
    entry = Entry("sub/a.png", 3, 123, file_hash(tmp_path / "a.png"), "w" * 64, "s1", ("long hair", "ü"))
    book = Catalogue(tmp_path, "xmp:ext")
    book.put(entry)
    book.put(Entry("b.png", 1, 2, "h", "w", "s"))
    book.close()
    assert NAME.startswith(".") and (tmp_path / NAME).is_file()
    again = Catalogue(tmp_path, "xmp:ext")
    assert again.get("sub/a.png") == entry and again.keys() == {"sub/a.png", "b.png"}
    other = Catalogue(tmp_path, "hydrus")  # the same folder, another destination: nothing recorded
    assert other.get("sub/a.png") is None and other.keys() == set()
    other.close()
    again.forget(["b.png"])
    assert again.keys() == {"sub/a.png"}
    again.close()
    assert entry.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


def test_unwritable_folder_and_other_version(tmp_path):
    with pytest.raises(CatalogueError, match=NAME):
        Catalogue(tmp_path / "missing", "txt")
    Catalogue(tmp_path, "txt").close()
    db = sqlite3.connect(tmp_path / NAME)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    with pytest.raises(CatalogueError, match="version 99"):
        Catalogue(tmp_path, "txt")
