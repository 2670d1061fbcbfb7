"""The tag vocabulary: counting and selection, aliases, selected_tags.csv round trips, WD's real file, `i2v vocab`."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.booru.posts import post_record, read_posts, write_posts
from illust2vec.booru.sites import Post
from illust2vec.data.vocab import (
    CATEGORY_CODES,
    HEAD_ORDER,
    RATING_IDS,
    Vocab,
    apply_aliases,
    build_vocab,
    read_aliases,
    read_vocab,
    tag_id,
    write_vocab,
)
from illust2vec.errors import UserError
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board

WD_V3 = Path(__file__).resolve().parents[3] / "shared/fixtures/real/tagger-meta/wd-v3_selected_tags.reconstructed.csv"
I2V = [sys.executable, "-m", "illust2vec.cli"]


def record(id: int, rating: str = "g", status: str = "ok", **tags: list[str]) -> dict:
    """One row of the posts table with the given tags (general=..., character=..., meta=...)."""
    post = Post(
        id=id,
        md5=f"{id:032x}",
        file_url=f"http://board/{id}.png",
        file_ext="png",
        width=64,
        height=64,
        rating=rating,
        score=0,
        created_at=None,
        **{f"tags_{c}": tuple(tags.get(c, ())) for c in ("general", "character", "copyright", "artist", "meta")},
        site="danbooru",
        parent_id=None,
    )
    return post_record(post, status)


def write_crawl(root: Path, records: list[dict], parts: int = 2) -> Path:
    """A crawl directory holding these rows, split over several Parquet files as a real crawl is."""
    (root / "posts").mkdir(parents=True)
    for i in range(parts):
        write_posts(root / "posts" / f"part-{i:03d}.parquet", records[i::parts])
    return root


def by_category(vocab: Vocab) -> dict[str, list[tuple[str, int]]]:
    return {h: [(vocab.names[i], vocab.counts[i]) for i in rows] for h, rows in vocab.heads.items()}


@pytest.fixture
def small(tmp_path) -> Path:
    """Hand-counted posts: general a:4 b:3 c:3 d:1 (c ties b), characters, copyrights, an artist, meta, statuses."""
    return write_crawl(
        tmp_path / "crawl",
        [
            record(1, "g", general=["a", "b", "c"], character=["miku"], copyright=["vocaloid"], meta=["highres"]),
            record(2, "g", general=["a", "b", "c"], character=["miku", "rin"], copyright=["vocaloid"], artist=["x"]),
            record(3, "s", general=["a", "c", "b"], character=["rin"], artist=["x"], meta=["highres"]),
            record(4, "e", general=["a", "d"], copyright=["original"], meta=["highres"]),
            record(5, "", general=["z"] * 2),  # a tag listed twice on one post counts once
            record(6, "q", "failed", general=["a", "failed_only"], character=["gumi"]),
            record(7, "g", "no_file", general=["failed_only"]),
        ],
    )


def test_top_n_per_category_ties_by_name_and_wd_order(small):
    vocab = build_vocab([small], top={"general": 3})
    assert list(vocab.heads) == ["rating", "general", "character", "copyright"]
    assert by_category(vocab) == {
        "rating": [("general", 2), ("sensitive", 1), ("questionable", 0), ("explicit", 1)],
        "general": [("a", 4), ("b", 3), ("c", 3)],
        "character": [("miku", 2), ("rin", 2)],
        "copyright": [("vocaloid", 2), ("original", 1)],
    }
    assert vocab.tag_ids[:4] == tuple(RATING_IDS.values())
    assert vocab.tag_ids[4] == tag_id("a") and len(set(vocab.tag_ids)) == len(vocab)
    assert by_category(build_vocab([small], top={"general": 2, "character": 1}))["character"] == [("miku", 2)]
    assert by_category(build_vocab([small], top={"general": 0})).get("general") is None
    ranks = [HEAD_ORDER.index(next(h for h, c in CATEGORY_CODES.items() if c == cat)) for cat in vocab.categories]
    assert ranks == sorted(ranks)


def test_min_count_meta_never_ratings_always(small):
    vocab = build_vocab([small], min_count=2)
    general = by_category(vocab)["general"]
    assert general == [("a", 4), ("b", 3), ("c", 3)]
    assert "highres" not in vocab.names and CATEGORY_CODES["meta"] not in vocab.categories
    assert vocab.head_names("rating") == tuple(RATING_IDS)  # questionable (0 posts) stays in despite min_count
    assert "failed_only" not in vocab.names and "gumi" not in vocab.names  # only posts with an image count
    with pytest.raises(ValueError, match="meta"):
        build_vocab([small], top={"meta": 5})


def test_statuses_choose_the_posts_counted(small):
    vocab = build_vocab([small], statuses=("ok", "failed", "no_file"))
    assert dict(by_category(vocab)["general"])["failed_only"] == 2
    assert dict(by_category(vocab)["general"])["a"] == 5
    with pytest.raises(ValueError, match="unknown statuses"):
        build_vocab([small], statuses=("okay",))
    with pytest.raises(UserError, match="no posts with status not_image"):
        build_vocab([small], statuses=("not_image",))


def test_artist_is_opt_in_and_last(small):
    assert "artist" not in build_vocab([small], top={"artist": 5}).heads
    vocab = build_vocab([small], artist=True)
    assert list(vocab.heads)[-1] == "artist" and by_category(vocab)["artist"] == [("x", 2)]
    assert vocab.categories[-1] == CATEGORY_CODES["artist"]


def test_apply_aliases_chains_cycles_dedupes():
    aliases = {"a": "b", "b": "c", "x": "y", "y": "x", "self": "self", "p": "q", "q": "r", "r": "q"}
    assert apply_aliases(["a", "b", "c", "d"], aliases) == ["c", "d"]
    assert apply_aliases(["x", "y", "self", "p"], aliases) == ["x", "y", "self", "p"]  # cycles rename nothing
    assert apply_aliases(["d", "a", "d"], aliases) == ["d", "c"]


def test_aliases_apply_before_counting(tmp_path):
    crawl_dir = write_crawl(
        tmp_path / "c",
        [
            record(1, general=["old_name"]),
            record(2, general=["new_name"]),
            record(3, general=["old_name", "new_name", "older_name"]),
            record(4, general=["older_name", "other"]),
            record(5, general=["other"]),
        ],
    )
    plain = dict(by_category(build_vocab([crawl_dir]))["general"])
    assert plain == {"old_name": 2, "new_name": 2, "older_name": 2, "other": 2}
    aliases = {"older_name": "old_name", "old_name": "new_name"}
    merged = by_category(build_vocab([crawl_dir], aliases=aliases))["general"]
    assert merged == [("new_name", 4), ("other", 2)]  # post 3 carries the tag three times over: counted once


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


def test_write_read_round_trip(small, tmp_path):
    vocab = build_vocab([small], artist=True)
    odd = Vocab(
        vocab.tag_ids + (7,), vocab.names + ('don\'t_say_"lazy",_ok',), vocab.categories + (1,), (0,) * (len(vocab) + 1)
    )
    for v in (vocab, odd):
        path = tmp_path / "out" / "selected_tags.csv"
        write_vocab(v, path)
        back = read_vocab(path)
        assert back == v and back.hash == v.hash and back.heads == v.heads
        assert not list(path.parent.glob("*.tmp"))
    lines = path.read_text().splitlines()
    assert lines[0] == "tag_id,name,category,count" and lines[1] == "9999999,general,9,0"
    assert lines[-1] == '7,"don\'t_say_""lazy"",_ok",1,0'


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


@pytest.fixture(scope="module")
def crawled(tmp_path_factory) -> Path:
    """A small crawl of the synthetic board, made once for this module."""
    out = tmp_path_factory.mktemp("crawl")
    with start_board(SynthConfig(posts=60, seed=5)) as server:
        crawl(
            CrawlConfig(
                url=server.url,
                out=out,
                api_rate=200,
                file_rate=200,
                backoff=0.01,
                decoders=2,
                concurrency=8,
                flush_seconds=0.5,
            )
        )
    return out


def test_build_vocab_on_a_crawl_matches_a_plain_count(crawled):
    rows = [r for r in read_posts([crawled]).to_pylist() if r["status"] == "ok"]
    assert rows and len(rows) < 60  # the board hides or withholds some files: those posts are not counted
    vocab = build_vocab([crawled], artist=True)
    for head in ("general", "character", "copyright", "artist"):
        expected = Counter(t for r in rows for t in set(r[f"tags_{head}"]))
        assert dict(by_category(vocab)[head]) == dict(expected)
    ratings = Counter(r["rating"] for r in rows)
    assert vocab.counts[:4] == tuple(ratings[c] for c in "gsqe")


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*I2V, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_cli_vocab(crawled, tmp_path):
    r = run(
        "vocab", str(crawled), "--out", "tags/selected_tags.csv", "--top", "5", "--top-copyright", "2", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    vocab = read_vocab(tmp_path / "tags/selected_tags.csv")
    sizes = {h: len(rows) for h, rows in vocab.heads.items()}
    assert sizes == {"rating": 4, "general": 5, "character": 5, "copyright": 2}
    assert vocab == build_vocab([crawled], top={"general": 5, "character": 5, "copyright": 2})
    for head, n in sizes.items():
        assert f"{head}: {n} tags" in r.stderr
    assert (
        (tmp_path / "tags/selected_tags.csv").read_text().startswith("tag_id,name,category,count\n9999999,general,9,")
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["vocab", "/nonexistent/crawl"], "no posts/*.parquet"),
        (["vocab", "CRAWL", "--top-artist", "3"], "--top-artist needs --artist"),
        (["vocab", "CRAWL", "--aliases", "missing.csv"], "missing.csv: no such file"),
        (["vocab", "CRAWL", "--top", "-1"], "Invalid value for '--top'"),
    ],
)
def test_cli_vocab_mistakes_are_one_line(crawled, tmp_path, args, needle):
    r = run(*[str(crawled) if a == "CRAWL" else a for a in args], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "selected_tags.csv").exists()


def test_cli_vocab_with_aliases(crawled, tmp_path):
    top = build_vocab([crawled], top={"general": 1}).head_names("general")[0]
    (tmp_path / "aliases.csv").write_text(f"antecedent_name,consequent_name,status\n{top},renamed_tag,active\n")
    r = run("vocab", str(crawled), "--top", "3", "--aliases", "aliases.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = read_vocab(tmp_path / "selected_tags.csv").head_names("general")
    assert names[0] == "renamed_tag" and top not in names
