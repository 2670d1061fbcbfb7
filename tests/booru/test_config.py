"""CrawlConfig checks itself: options as the command line gives them are normalised, a bad one is one UserError."""

import json
import socket
from pathlib import Path

import pytest

from illust2vec.booru.client import USER_AGENT
from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.errors import UserError

URL = "http://127.0.0.1:9"


def test_command_line_values_are_normalised(tmp_path):
    cfg = CrawlConfig(url=URL, out=str(tmp_path), ids="5..10", shard="1/3", image_size="512", user_agent=None)
    assert (cfg.out, cfg.ids, cfg.shard, cfg.image_size, cfg.user_agent) == (tmp_path, (5, 10), (1, 3), 512, USER_AGENT)
    assert CrawlConfig(url=URL, out=tmp_path, ids=None, image_size="original").image_size is None
    same = CrawlConfig(url=URL, out=tmp_path, ids=[5, 10], shard=[1, 3], image_size=512)
    assert same.identity() == cfg.identity()
    saved = json.loads(json.dumps(cfg.to_json()))
    assert saved["ids"] == [5, 10] and saved["shard"] == [1, 3] and saved["out"] == str(tmp_path)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("url", "danbooru.donmai.us", "--url"),
        ("url", "", "--url"),
        ("site", "pixiv", "--site must be one of danbooru, moebooru, gelbooru"),
        ("ids", "9-3", "--ids takes A..B"),
        ("ids", "10..5", "--ids 10..5: need 0 < A <= B"),
        ("ids", (0, 5), "--ids 0..5"),
        ("ids", (1.5, 5), "--ids takes A..B"),
        ("shard", "3/2", "--shard 3/2: need 0 <= I < N"),
        ("shard", (3, 2), "--shard 3/2"),
        ("shard", "x", "--shard takes I/N"),
        ("image_size", "big", "--image-size"),
        ("image_size", 8, "--image-size"),
        ("limit", 0, "--limit"),
        ("concurrency", 0, "--concurrency"),
        ("concurrency", 2.5, "--concurrency"),
        ("api_rate", 0, "--api-rate"),
        ("file_rate", -1.0, "--file-rate"),
        ("shard_size", 0, "--shard-size"),
        ("flush_seconds", 0, "flush_seconds"),
        ("attempts", 0, "attempts"),
        ("backoff", -1, "backoff"),
        ("decoders", 0, "decoders"),
    ],
)
def test_a_bad_field_is_one_line_naming_it(field, value, needle, tmp_path):
    with pytest.raises(UserError) as e:
        CrawlConfig(**{"url": URL, "out": tmp_path, field: value})
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing written for a config that never was


def test_a_board_that_does_not_answer_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = CrawlConfig(url=f"http://127.0.0.1:{port}", out=tmp_path / "c", attempts=2, backoff=0.01)
    with pytest.raises(UserError, match=f"127.0.0.1:{port} did not answer on /posts.json: connection error"):
        crawl(cfg)
    assert Path(tmp_path / "c" / "crawl.sqlite").exists()  # the state is kept: the same command resumes
