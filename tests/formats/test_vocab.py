"""The vocabulary files: selected_tags.csv and alias CSVs round trip; WD's real file; every fault is one clear line."""

from pathlib import Path

import pytest

from illust2vec.errors import UserError
from illust2vec.formats.categories import RATING_IDS
from illust2vec.formats.vocab import Vocab, read_aliases, read_vocab, write_aliases, write_vocab

WD_V3 = Path(__file__).resolve().parents[3] / "shared/fixtures/real/tagger-meta/wd-v3_selected_tags.reconstructed.csv"


def every_head() -> Vocab:
    """A vocabulary with every head, awkward names (comma, quotes, unicode) and counts of zero."""
    names = ("general", "sensitive", "questionable", "explicit", "1girl", 'don\'t_say_"lazy",_ok', "初音ミク", "miku")
    names += ("vocaloid", "artist_x")
    return Vocab(
        (*RATING_IDS.values(), 1, 7, 2**47 + 5, 3, 4, 5),
        names,
        (9, 9, 9, 9, 0, 0, 0, 4, 3, 1),
        (10, 0, 3, 1, 9, 0, 2, 2, 2, 1),
    )


def test_selected_tags_round_trip(tmp_path):
    vocab = every_head()
    path = tmp_path / "out" / "selected_tags.csv"
    write_vocab(vocab, path)
    back = read_vocab(path)
    assert back == vocab and back.hash == vocab.hash and back.heads == vocab.heads
    assert list(back.heads) == ["rating", "general", "character", "copyright", "artist"]
    assert not list(path.parent.glob("*.tmp"))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "tag_id,name,category,count" and lines[1] == "9999999,general,9,10"
    assert lines[6] == '7,"don\'t_say_""lazy"",_ok",0,0'
    write_vocab(back, path)  # writing what was read gives the same bytes
    assert path.read_text(encoding="utf-8").splitlines() == lines


def test_aliases_round_trip(tmp_path):
    aliases = {"long_hair_ornament": "hair_ornament", "a,b": "c", 'say_"hi"': "hello", "旧": "新", "x": "y"}
    path = tmp_path / "aliases.csv"
    write_aliases(aliases, path)
    assert read_aliases(path) == aliases
    assert path.read_text(encoding="utf-8").splitlines()[0] == "old,new"
    write_aliases({}, path)
    assert read_aliases(path) == {}


def test_read_aliases_formats(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("old_tag,new_tag\nhair_ornament,hair_ornaments\n\n")
    assert read_aliases(plain) == {"old_tag": "new_tag", "hair_ornament": "hair_ornaments"}
    header = tmp_path / "header.csv"
    header.write_text("old,new\na,b\n")
    assert read_aliases(header) == {"a": "b"}
    danbooru = tmp_path / "tag_aliases.csv"
    danbooru.write_text(
        "id,antecedent_name,consequent_name,creator_id,status,reason\n"
        "1,long_hair_ornament,hair_ornament,5,active,\n"
        '2,"a,b",c,5,retired,"old, retired"\n'
        "3,wrong,right,5,deleted,\n"
        "4,maybe,later,5,pending,\n"
    )
    assert read_aliases(danbooru) == {"long_hair_ornament": "hair_ornament", "a,b": "c"}
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert read_aliases(empty) == {}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a,b,c\n", "bad.csv:1: expected two columns old,new"),
        ("a,b\na,c\n", "bad.csv:2: 'a' is aliased to both 'b' and 'c'"),
        ("a,\n", "bad.csv:1: empty tag name"),
        ("antecedent_name,consequent_name,status\nx,y\n", "bad.csv:2: expected 3 fields"),
        (None, "bad.csv: no such file"),
    ],
)
def test_read_aliases_refuses_bad_files(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as e:
        read_aliases(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_hash_is_names_and_categories_in_order():
    base = Vocab((9999999, 1, 2), ("general", "a", "b"), (9, 0, 0), (5, 4, 3))
    assert Vocab((1, 2, 3), ("general", "a", "b"), (9, 0, 0), (0, 0, 0)).hash == base.hash
    assert Vocab((9999999, 2, 1), ("general", "b", "a"), (9, 0, 0), (5, 3, 4)).hash != base.hash
    assert Vocab((9999999, 1, 2), ("general", "a", "b"), (9, 0, 4), (5, 4, 3)).hash != base.hash
    assert len(base.hash) == 64


def test_heads_are_contiguous_and_interleaving_is_refused(tmp_path):
    vocab = Vocab((9999999, 1, 2, 3), ("general", "a", "miku", "vocaloid"), (9, 0, 4, 3), (1, 1, 1, 1))
    assert vocab.heads == {"rating": (0,), "general": (1,), "character": (2,), "copyright": (3,)}
    assert vocab.head_names("character") == ("miku",)
    with pytest.raises(ValueError, match="row 3"):
        Vocab((1, 2, 3, 4), ("a", "miku", "b", "c"), (0, 4, 0, 0), (1, 1, 1, 1))
    path = tmp_path / "interleaved.csv"
    path.write_text("tag_id,name,category,count\n1,a,0,5\n2,miku,4,5\n3,b,0,4\n")
    with pytest.raises(UserError, match=r"interleaved.csv:4: 'b' \(category 0\) comes after character tags"):
        read_vocab(path)


def test_encode_positions_within_heads():
    vocab = Vocab(
        (9999999, 9999998, 9999997, 9999996, 1, 2, 3, 4, 5),
        ("general", "sensitive", "questionable", "explicit", "1girl", "solo", "smile", "miku", "rin"),
        (9, 9, 9, 9, 0, 0, 0, 4, 4),
        (0,) * 9,
    )
    got = vocab.encode("q", {"general": ["smile", "unknown", "1girl", "smile"], "character": ["rin"], "meta": ["x"]})
    assert got == {"rating": [2], "general": [0, 2], "character": [1]}
    assert vocab.encode("", {}) == {"rating": [], "general": [], "character": []}
    assert vocab.encode("e", {"copyright": ["vocaloid"]})["rating"] == [3]


def test_reads_wd_v3_selected_tags():
    if not WD_V3.exists():
        pytest.skip(f"the real WD v3 selected_tags.csv is not here ({WD_V3})")
    vocab = read_vocab(WD_V3)
    assert {h: len(rows) for h, rows in vocab.heads.items()} == {"rating": 4, "general": 8106, "character": 2751}
    assert vocab.names[:4] == tuple(RATING_IDS) and vocab.tag_ids[:4] == tuple(RATING_IDS.values())
    assert vocab.head_names("general")[:2] == ("1girl", "solo")
    general = [vocab.counts[i] for i in vocab.heads["general"]]
    assert general == sorted(general, reverse=True)
    labels = vocab.encode("s", {"general": ["solo", "1girl"], "character": ["hatsune_miku"]})
    assert labels["rating"] == [1] and labels["general"] == [0, 1] and len(labels["character"]) == 1


def test_writing_wd_v3_back_gives_the_same_bytes(tmp_path):
    if not WD_V3.exists():
        pytest.skip(f"the real WD v3 selected_tags.csv is not here ({WD_V3})")
    write_vocab(read_vocab(WD_V3), tmp_path / "selected_tags.csv")
    assert (tmp_path / "selected_tags.csv").read_bytes() == WD_V3.read_bytes()


HEAD = "tag_id,name,category,count\n"


@pytest.mark.parametrize(
    "text, needle",
    [
        (None, "no such file"),
        ("", "empty file"),
        ("id,name,category,count\n", ":1: the header must be tag_id,name,category,count"),
        (HEAD + "9999999.0,general,9,5\n", ":2: tag_id, category and count must be integers"),
        (HEAD + "1,a,0\n", ":2: 3 fields"),
        (HEAD + "1,a,0,5\n2,b,5,3\n", ":3: category 5 is not a head's"),
        (HEAD + "1,a,0,5\n2,a,0,3\n", ":3: 'a' (category 0) is listed twice"),
        (HEAD + "1,a,0,5\n2,,0,3\n", ":3: empty tag name"),
        (HEAD + "1,safe,9,5\n", ":2: 'safe' is not a rating tag"),
        (HEAD + '1,"a,0,5\n', "not a readable CSV file"),
    ],
)
def test_read_vocab_refuses_bad_files(tmp_path, text, needle):
    path = tmp_path / "selected_tags.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as e:
        read_vocab(path)
    message = str(e.value)
    assert message.startswith(str(path)) and needle in message and "\n" not in message, message


def test_read_vocab_refuses_non_utf8(tmp_path):
    path = tmp_path / "selected_tags.csv"
    path.write_bytes(HEAD.encode() + b"1,\xff\xfe,0,5\n")
    with pytest.raises(UserError, match="not a readable CSV file"):
        read_vocab(path)


def test_selected_tags_and_aliases_round_trip_through_object_storage(bucket, tmp_path):
    vocab = every_head()
    write_vocab(vocab, f"{bucket}/v/selected_tags.csv")
    write_vocab(vocab, tmp_path / "selected_tags.csv")
    assert read_vocab(f"{bucket}/v/selected_tags.csv") == vocab
    from illust2vec.util import storage

    assert storage.read_bytes(f"{bucket}/v/selected_tags.csv") == (tmp_path / "selected_tags.csv").read_bytes()
    write_aliases({"a": "b", "旧": "新"}, f"{bucket}/aliases.csv")
    assert read_aliases(f"{bucket}/aliases.csv") == {"a": "b", "旧": "新"}
    with pytest.raises(UserError, match=rf"^{bucket}/nothing.csv: no such file$"):
        read_vocab(f"{bucket}/nothing.csv")
    with pytest.raises(UserError, match=r"^s3://no-such-bucket-i2v/x.csv: cannot read: no such bucket$"):
        read_vocab("s3://no-such-bucket-i2v/x.csv")
