"""`i2v crawl --ray` on a local Ray cluster of 2 CPUs: blocks as tasks, a task killed and retried, a rerun that skips
finished blocks, and an output that the later stages read as they read one crawl."""

import io
import os

import pytest

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.booru.distribute import plan_blocks
from illust2vec.booru.writer import KILL_BEFORE_RECORD
from illust2vec.data.vocab import build_vocab
from illust2vec.formats.posts import export_csv, read_posts
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board
from illust2vec.util import storage

from .test_crawl import FAST, check_exactly_once
from .test_crawl_storage import download_tree, names, rows_by_id

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """One local Ray cluster for the module (a start costs seconds). Its workers are started with the hook that
    kills the first of them to reach its 2nd batch right after the upload, before the record: Ray retries it."""
    from illust2vec.util.cluster import connect

    marker = tmp_path_factory.mktemp("kill") / "killed"
    os.environ[KILL_BEFORE_RECORD] = f"2:{marker}"
    try:
        with connect(None, num_cpus=2):
            os.environ.pop(KILL_BEFORE_RECORD)  # the workers have it; this process must not kill itself
            yield marker
    finally:
        os.environ.pop(KILL_BEFORE_RECORD, None)


@pytest.fixture(scope="module")
def server():
    with start_board(SynthConfig(posts=80, seed=71, min_size=64, max_size=400)) as s:
        s.wait_warm(60)
        yield s


def ray_config(url: str, out, **kw) -> CrawlConfig:
    return CrawlConfig(url=url, out=out, **{**FAST, "shard_size": 6, "concurrency": 4, "ray": True, **kw})


def test_plan_blocks_cuts_ranges_newest_first():
    assert plan_blocks([(1, 100)], 40) == [(61, 100), (21, 60), (1, 20)]
    assert plan_blocks([(200, 250), (1, 30)], 40) == [(211, 250), (200, 210), (1, 30)]


def test_crawl_in_blocks_on_ray_equals_one_crawl(cluster, server, bucket, tmp_path):
    local = tmp_path / "plain"
    crawl(CrawlConfig(url=server.url, out=local, **{**FAST, "shard_size": 6}))
    url = f"{bucket}/crawl"
    cfg = ray_config(server.url, url, state_dir=tmp_path / "state", block_size=30)
    first = crawl(cfg)
    assert cluster.exists(), "no task was killed: the retry went untested"
    assert first.failed == 0 and first.blocks["crawled"] == first.blocks["total"] >= 4
    copy = download_tree(url, tmp_path / "copy")
    got = check_exactly_once(copy, server.board)
    assert got["ids"] == {p.id for p in server.board.posts}
    assert rows_by_id(copy) == rows_by_id(local)
    assert sorted(got["samples"]) == sorted(check_exactly_once(local, server.board)["samples"])

    held = names(url)
    again = crawl(cfg)  # every block finished: nothing to do, nothing asked of the board
    assert again.blocks == {"total": first.blocks["total"], "skipped": first.blocks["total"], "crawled": 0}
    assert again.requests == 0 and again.statuses == first.statuses and names(url) == held

    # The later stages read the parts of the blocks as one crawl, through their own globs.
    vocab = build_vocab([copy], top={"general": 20, "character": 5, "copyright": 3})
    assert len(vocab) > 0
    text = io.StringIO()
    assert export_csv([copy], text) == len(server.board.posts)
    shards = {r["shard"] for r in read_posts([copy], ["shard"]).to_pylist() if r["shard"]}
    assert shards and all((copy / s).is_file() for s in shards)


def test_a_rerun_crawls_again_only_a_block_whose_files_are_gone(cluster, server, tmp_path):
    out = tmp_path / "crawl"
    cfg = ray_config(server.url, out, block_size=50)
    first = crawl(cfg)
    assert first.blocks["crawled"] == first.blocks["total"]
    parts = sorted(p.name for p in (out / "posts").glob("[0-9]*.parquet"))
    block0 = [p for p in parts if len(p) == len("000000.parquet")]
    (out / "posts" / block0[0]).unlink()  # a part of block 0 lost
    storage.write_bytes(out / "posts" / "9000000.parquet", (out / "posts" / parts[-1]).read_bytes())  # no block's
    again = crawl(cfg)
    assert again.blocks == {"total": first.blocks["total"], "skipped": first.blocks["total"] - 1, "crawled": 1}
    assert not (out / "posts" / "9000000.parquet").exists()
    got = check_exactly_once(out, server.board)
    assert got["ids"] == {p.id for p in server.board.posts}
