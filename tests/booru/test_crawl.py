"""`i2v crawl` against the synthetic board: every post once, every image once and intact, through faults."""

import dataclasses
import errno
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from illust2vec.booru.crawl import CrawlConfig, DiskFull, crawl, parse_ids
from illust2vec.booru.lister import shard_ranges
from illust2vec.booru.sites import SITES
from illust2vec.errors import UserError
from illust2vec.formats import shards
from illust2vec.formats.posts import export_csv, read_posts
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.faults import Faults
from illust2vec.synth.server import start_board
from illust2vec.util.shard import parse_shard

FAST = dict(api_rate=200.0, file_rate=200.0, backoff=0.01, decoders=2, concurrency=8, flush_seconds=0.5)


def fast_config(url: str, out: Path, **kw) -> CrawlConfig:
    return CrawlConfig(url=url, out=out, **{**FAST, **kw})


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in the crawl's tar shards, by key; fails on a key seen twice."""
    samples: dict[str, dict[str, bytes]] = {}
    for key, files in shards.iter_samples(shards.image_shards(out)):
        assert key not in samples, f"{key} is in two samples"
        samples[key] = files
    return samples


def check_exactly_once(out: Path, board) -> dict:
    table = read_posts([out]).to_pylist()
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids)), "a post is in the Parquet twice"
    assert not list(out.glob("**/*.tmp"))
    samples = read_shards(out)
    ok = [r for r in table if r["status"] == "ok"]
    assert {r["md5"] for r in ok} == set(samples)
    return {"rows": table, "samples": samples, "ids": set(ids)}


@pytest.fixture(scope="module")
def board_server():
    with start_board(SynthConfig(posts=90, seed=21)) as server:
        server.wait_warm(60)
        yield server


def test_parse_ids_shard_and_ranges():
    assert parse_ids("5..10") == (5, 10)
    assert parse_shard("2/4") == (2, 4)
    for bad in ("5-10", "10..5", "x..y"):
        with pytest.raises(UserError):
            parse_ids(bad)
    with pytest.raises(UserError):
        parse_shard("4/4")
    parts = [shard_ranges(1, 100, (i, 3), contiguous=True) for i in range(3)]
    covered = sorted(i for p in parts for a, b in p for i in range(a, b + 1))
    assert covered == list(range(1, 101))
    blocks = [shard_ranges(1, 450_000, (i, 2), contiguous=False) for i in range(2)]
    assert blocks[0][0] == (400_000, 450_000) and blocks[1][0] == (300_000, 399_999)  # newest first, round-robin
    covered = sorted(x for p in blocks for a, b in p for x in (a, b))
    assert covered[0] == 1 and covered[-1] == 450_000


def test_crawl_keeps_originals_byte_for_byte(board_server, tmp_path):
    summary = crawl(fast_config(board_server.url, tmp_path))
    board = board_server.board
    got = check_exactly_once(tmp_path, board)
    assert got["ids"] == {p.id for p in board.posts}
    by_id = {r["id"]: r for r in got["rows"]}
    for post in board.posts:
        row = by_id[post.id]
        if post.is_deleted or post.is_banned:
            assert row["status"] == "no_file"
        elif not post.is_image:
            assert row["status"] == "not_image"
        else:
            assert row["status"] == "ok"
            assert got["samples"][row["md5"]][post.file_ext] == board.file(post)
            assert sorted(row["tags_character"]) == sorted(post.tags["character"])
            assert sorted(row["tags_general"]) == sorted(post.tags["general"])
            assert row["rating"] == post.rating and row["width"] == post.width
    assert summary.failed == 0 and summary.statuses["ok"] == len(got["samples"])
    meta = json.loads(next(iter(got["samples"].values()))["json"])
    assert {"id", "md5", "tags_general", "rating", "stored_width"} <= set(meta)
    assert "api_key" not in (tmp_path / "crawl-config.json").read_text()


def test_crawl_resizes_the_longer_side(board_server, tmp_path):
    a, b = board_server.board.posts[3].id, board_server.board.posts[50].id
    crawl(fast_config(board_server.url, tmp_path, ids=(a, b), image_size=256))
    got = check_exactly_once(tmp_path, board_server.board)
    assert got["ids"] == {p.id for p in board_server.board.posts if a <= p.id <= b}  # both ends included
    for files in got["samples"].values():
        ext = next(k for k in files if k != "json")
        img = Image.open(io.BytesIO(files[ext]))
        assert max(img.size) <= 256
        meta = json.loads(files["json"])
        assert (meta["stored_width"], meta["stored_height"]) == img.size
        if max(meta["width"], meta["height"]) > 256:
            assert max(img.size) == 256 and ext in ("jpg", "png")


def test_shards_split_the_board_between_crawlers(board_server, tmp_path):
    seen = []
    top = board_server.board.posts[-1].id
    for i in range(3):
        crawl(fast_config(board_server.url, tmp_path / str(i), ids=(1, top), shard=(i, 3)))
        seen.append(check_exactly_once(tmp_path / str(i), board_server.board)["ids"])
    assert set().union(*seen) == {p.id for p in board_server.board.posts}
    assert sum(len(s) for s in seen) == len(board_server.board.posts) and all(seen)


def test_limit_then_resume_lists_the_rest_once(board_server, tmp_path):
    first = crawl(fast_config(board_server.url, tmp_path, limit=30))
    assert sum(first.statuses.values()) == 30
    crawl(fast_config(board_server.url, tmp_path, limit=1000))
    got = check_exactly_once(tmp_path, board_server.board)
    assert got["ids"] == {p.id for p in board_server.board.posts}


def test_another_crawl_in_the_same_directory_is_refused(board_server, tmp_path):
    crawl(fast_config(board_server.url, tmp_path, ids=(1, 10)))
    with pytest.raises(UserError, match="holds another crawl"):
        crawl(fast_config(board_server.url, tmp_path, ids=(1, 20)))


def test_faults_are_survived_and_bad_files_recorded(tmp_path):
    faults = Faults(error_rate=0.1, truncate_rate=0.05, rate_limit=40, bad_md5_rate=0.08, seed=3)
    with start_board(SynthConfig(posts=80, seed=22), faults=faults) as server:
        server.wait_warm(60)
        summary = crawl(fast_config(server.url, tmp_path, attempts=8))
        stats = server.stats
        board = server.board
    assert stats["errors"] > 0 and stats["truncated"] > 0
    got = check_exactly_once(tmp_path, board)
    assert got["ids"] == {p.id for p in board.posts}
    bad = {p.id for p in board.posts if faults.is_bad_md5(p.id) and p.is_image and not (p.is_deleted or p.is_banned)}
    assert bad, "the seed should make some files bad"
    failed = {r["id"] for r in got["rows"] if r["status"] == "failed"}
    assert failed == bad
    assert all("md5 mismatch" in r["reason"] for r in got["rows"] if r["status"] == "failed")
    assert summary.failed == len(bad)
    for r in got["rows"]:
        if r["status"] == "ok":
            ext = next(k for k in got["samples"][r["md5"]] if k != "json")
            assert hashlib.md5(got["samples"][r["md5"]][ext]).hexdigest() == r["md5"]


def test_disk_full_stops_cleanly_and_resumes(board_server, tmp_path, monkeypatch):
    real_add = shards.ShardWriter.add
    calls = {"n": 0}

    def add(self, key, files):
        calls["n"] += 1
        if calls["n"] > 25:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, key, files)

    monkeypatch.setattr(shards.ShardWriter, "add", add)
    with pytest.raises(DiskFull, match="full"):
        crawl(fast_config(board_server.url, tmp_path, shard_size=10))
    assert not list(tmp_path.glob("**/*.tmp"))
    monkeypatch.setattr(shards.ShardWriter, "add", real_add)
    crawl(fast_config(board_server.url, tmp_path, shard_size=10))
    got = check_exactly_once(tmp_path, board_server.board)
    assert got["ids"] == {p.id for p in board_server.board.posts}


def test_export_csv_writes_the_seeds_columns(board_server, tmp_path):
    crawl(fast_config(board_server.url, tmp_path, ids=(1, 40)))
    buf = io.StringIO()
    rows = export_csv([tmp_path], buf)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "id,md5,rating,general,character,copyright,artist,meta"
    expected = [p for p in board_server.board.posts if p.id <= 40]
    assert rows == len(lines) - 1 == read_posts([tmp_path]).num_rows == len(expected)
    first = expected[0]
    assert lines[1].split(",")[0] == str(first.id)
    assert lines[1].split(",")[4] == " ".join(first.tags["character"])


@pytest.mark.parametrize("site", ["moebooru", "gelbooru"])
def test_flat_tag_sites_crawl_with_categories_from_their_tag_api(board_server, tmp_path, site):
    summary = crawl(fast_config(board_server.url, tmp_path, site=site))
    board = board_server.board
    got = check_exactly_once(tmp_path, board)
    visible = {p.id for p in board.posts if not (p.is_deleted or p.is_banned)}
    assert visible <= got["ids"]  # Gelbooru hides deleted posts; Moebooru lists them without a file
    by_id = {r["id"]: r for r in got["rows"]}
    for post in board.posts:
        if post.id not in visible:
            continue
        row = by_id[post.id]
        assert row["site"] == site
        assert sorted(row["tags_character"]) == sorted(post.tags["character"])
        assert sorted(row["tags_copyright"]) == sorted(post.tags["copyright"])
        assert sorted(row["tags_general"]) == sorted(post.tags["general"])
        if post.is_image:
            assert row["status"] == "ok" and row["md5"] in got["samples"]
    assert summary.failed == 0


def test_non_images_are_kept_when_asked(board_server, tmp_path):
    crawl(fast_config(board_server.url, tmp_path, keep_non_images=True))
    got = check_exactly_once(tmp_path, board_server.board)
    others = [p for p in board_server.board.posts if not p.is_image and not (p.is_deleted or p.is_banned)]
    assert others, "the board should hold a zip or an mp4"
    for post in others:
        md5 = board_server.board.md5(post)
        assert got["samples"][md5][post.file_ext] == board_server.board.file(post)


def seeded(faults: Faults, clean: range, fired: dict[str, range]) -> Faults:
    """`faults` with the first seed under which API requests `clean` get no html or cut_json fault and each fault
    of `fired` is the one given on one of its requests at least (requests are numbered as the lister sends them,
    one by one; html is checked before cut_json)."""

    def given(f: Faults, k: str, n: int) -> bool:
        return f.fires(k, n) and not (k == "cut_json" and f.fires("html", n))

    for seed in range(10_000):
        f = dataclasses.replace(faults, seed=seed)
        if not any(f.fires(k, n) for k in ("html", "cut_json") for n in clean) and all(
            any(given(f, k, n) for n in ns) for k, ns in fired.items()
        ):
            return f
    raise AssertionError("no seed fits")


@pytest.fixture
def small_pages(monkeypatch):
    """Danbooru's pages cut to 10 posts, so that a small board takes many API requests."""
    monkeypatch.setitem(SITES, "danbooru", dataclasses.replace(SITES["danbooru"], page_limit=10))


def test_html_pages_and_json_cut_short_are_retried_and_every_post_listed_once(small_pages, tmp_path):
    # The board's front end answers now and then with a challenge page and status 200, or with JSON cut short
    # that ends cleanly: the crawl retries them like a 5xx and finishes in one run.
    faults = Faults(html_rate=0.2, cut_json_rate=0.2, paths="api")
    faults = seeded(faults, clean=range(1, 2), fired={"html": range(2, 9), "cut_json": range(2, 9)})
    with start_board(SynthConfig(posts=80, seed=23), faults=faults) as server:
        server.wait_warm(60)
        summary = crawl(fast_config(server.url, tmp_path))
        stats = server.stats
        board = server.board
    assert stats["html"] > 0 and stats["cut_json"] > 0 and stats["api"] > 9
    assert summary.retries >= stats["html"] + stats["cut_json"]
    got = check_exactly_once(tmp_path, board)
    assert got["ids"] == {p.id for p in board.posts}
    assert summary.failed == 0
