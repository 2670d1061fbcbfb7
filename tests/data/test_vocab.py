"""The vocabulary stage: counting and selection, aliases applied before counting, its config, `i2v vocab`."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.booru.sites import Post, post_record
from illust2vec.data.vocab import VocabConfig, apply_aliases, build_vocab
from illust2vec.errors import UserError
from illust2vec.formats.categories import CATEGORY_CODES, HEAD_ORDER, RATING_IDS
from illust2vec.formats.posts import read_posts, write_posts
from illust2vec.formats.vocab import Vocab, read_vocab, tag_id
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board

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
    with pytest.raises(UserError, match="meta"):
        build_vocab([small], top={"meta": 5})


def test_statuses_choose_the_posts_counted(small):
    vocab = build_vocab([small], statuses=("ok", "failed", "no_file"))
    assert dict(by_category(vocab)["general"])["failed_only"] == 2
    assert dict(by_category(vocab)["general"])["a"] == 5
    with pytest.raises(UserError, match="unknown statuses"):
        build_vocab([small], statuses=("okay",))
    with pytest.raises(UserError, match="no posts with status not_image"):
        build_vocab([small], statuses=("not_image",))


def test_artist_is_opt_in_and_last(small):
    assert "artist" not in build_vocab([small]).heads
    with pytest.raises(UserError, match="--top-artist needs --artist"):
        build_vocab([small], top={"artist": 5})
    vocab = build_vocab([small], artist=True)
    assert list(vocab.heads)[-1] == "artist" and by_category(vocab)["artist"] == [("x", 2)]
    assert vocab.categories[-1] == CATEGORY_CODES["artist"]


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"top": {"meta": 5}}, "top: 'meta' is not one of"),
        ({"top": {"general": -1}}, "top['general'] must be a whole number >= 0"),
        ({"top": {"artist": 3}}, "--top-artist needs --artist"),
        ({"default_top": -1}, "--top must be a whole number >= 0"),
        ({"min_count": 1.5}, "--min-count must be a whole number"),
        ({"statuses": ("ok", "okay")}, "unknown statuses ['okay']"),
    ],
)
def test_config_refuses_mistakes_in_one_line(fields, needle):
    with pytest.raises(UserError) as e:
        VocabConfig(**fields)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_limits_and_the_keyword_shorthand(small):
    cfg = VocabConfig(top={"general": 2}, default_top=1, artist=True, aliases=None, statuses=["ok"])
    assert cfg.limits == {"general": 2, "character": 1, "copyright": 1, "artist": 1}
    assert cfg.statuses == ("ok",) and cfg.aliases == {}
    assert build_vocab([small], cfg) == build_vocab([small], top={"general": 2}, default_top=1, artist=True)
    with pytest.raises(TypeError):
        build_vocab([small], cfg, min_count=2)


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
