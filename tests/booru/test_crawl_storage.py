"""`i2v crawl --out s3://...` on a real S3 API (moto's server): the same posts as a local crawl, resume after kill -9
between an upload and its record, reconciling the bucket with the state, and one-line errors."""

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from illust2vec.booru.crawl import CrawlConfig, crawl, default_state_dir
from illust2vec.booru.writer import KILL_BEFORE_RECORD
from illust2vec.errors import UserError
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board
from illust2vec.util import storage

from .test_crawl import FAST, check_exactly_once

I2V = [sys.executable, "-m", "illust2vec.cli"]
CLI_FAST = ["--api-rate", "200", "--file-rate", "200", "--shard-size", "6", "--concurrency", "4"]


@pytest.fixture(scope="module")
def server():
    with start_board(SynthConfig(posts=60, seed=61, min_size=64, max_size=400)) as s:
        s.wait_warm(60)
        yield s


def s3_config(url: str, out: str, state: Path, **kw) -> CrawlConfig:
    return CrawlConfig(url=url, out=out, state_dir=state, **{**FAST, "shard_size": 6, **kw})


def download_tree(url: str, dest: Path) -> Path:
    """Every object under `url`, copied to the local directory `dest` (names relative to `url`)."""
    for loc in storage.walk_files(url):
        rel = str(loc)[len(url) + 1 :]
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        storage.download(loc, dest / rel)
    return dest


def names(url: str) -> set[str]:
    return {str(loc)[len(url) + 1 :] for loc in storage.walk_files(url)}


def rows_by_id(out: Path) -> dict[int, tuple]:
    from illust2vec.formats.posts import read_posts

    rows = read_posts([out], ["id", "md5", "status", "tags_general", "rating"]).to_pylist()
    return {r["id"]: (r["md5"], r["status"], tuple(r["tags_general"]), r["rating"]) for r in rows}


def test_crawl_to_s3_holds_what_a_local_crawl_holds(server, bucket, tmp_path):
    local = tmp_path / "local"
    crawl(CrawlConfig(url=server.url, out=local, **{**FAST, "shard_size": 6}))
    url = f"{bucket}/crawl"
    summary = crawl(s3_config(server.url, url, tmp_path / "state"))
    assert summary.failed == 0
    got = check_exactly_once(download_tree(url, tmp_path / "copy"), server.board)
    assert got["ids"] == {p.id for p in server.board.posts}
    assert rows_by_id(tmp_path / "copy") == rows_by_id(local)
    held = names(url)
    assert {"crawl-config.json", "crawl.json"} <= held and "crawl.sqlite" not in held
    assert (tmp_path / "state" / "crawl.sqlite").exists()
    assert not list((tmp_path / "state").glob("images/*")) and not list((tmp_path / "state").glob("posts/*"))
    # export-csv reads the crawl where it lies and writes where it is told
    csv_url = f"{bucket}/tags.csv"
    r = subprocess.run([*I2V, "export-csv", url, "--out", csv_url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = storage.read_text(csv_url).splitlines()
    assert lines[0].startswith("id,md5,rating") and len(lines) == 1 + len(server.board.posts)


def test_default_state_dir_is_a_cache_folder_named_after_the_url(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = default_state_dir("s3://bucket/crawl"), default_state_dir("s3://bucket/crawl2")
    assert a.parent == tmp_path / "illust2vec" / "crawl" and a.name.startswith("s3_bucket_crawl-") and a != b
    cfg = CrawlConfig(url="http://127.0.0.1:9", out="s3://bucket/crawl")
    assert cfg.home() == a and cfg.target().out == "s3://bucket/crawl"
    local = CrawlConfig(url="http://127.0.0.1:9", out=tmp_path / "c")
    assert local.home() == tmp_path / "c" and local.target().out is None  # a local crawl keeps its state inside


@pytest.mark.slow
def test_kill_9_between_upload_and_record_then_resume(server, bucket, tmp_path):
    url = f"{bucket}/crawl"
    cmd = [*I2V, "crawl", "--url", server.url, "--out", url, "--state-dir", str(tmp_path / "state"), *CLI_FAST]
    for n in (1, 2):  # killed after its 1st, then its 2nd upload: the second run records more than the first
        env = {**os.environ, KILL_BEFORE_RECORD: f"{n}:{tmp_path / f'kill-{n}'}"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == -9, r.stderr[-2000:]
        assert (tmp_path / f"kill-{n}").exists()
    before = names(url)
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "crawl.sqlite")) as db:
        recorded = {name for (name,) in db.execute("SELECT name FROM files")}
    assert {n for n in before if n[:6] in ("images", "posts/")} - recorded, "the last kill left no unrecorded upload"
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "left by an interrupted run" in final.stderr  # the last kill's upload was in the bucket, unrecorded
    got = check_exactly_once(download_tree(url, tmp_path / "copy"), server.board)
    assert got["ids"] == {p.id for p in server.board.posts}
    images = [p for p in server.board.posts if p.is_image and not (p.is_deleted or p.is_banned)]
    assert len(got["samples"]) == len(images)


def test_the_bucket_is_made_to_agree_with_the_state(server, bucket, tmp_path, s3_server):
    url, state = f"{bucket}/crawl", tmp_path / "state"
    crawl(s3_config(server.url, url, state))
    held = names(url)
    parts = sorted(n for n in held if n.startswith("posts/0"))
    shards = sorted(n for n in held if n.startswith("images/"))
    # a part nobody recorded (a copy of a real one: its posts would be there twice), and a recorded part gone
    storage.write_bytes(f"{url}/posts/000099.parquet", storage.read_bytes(f"{url}/{parts[0]}"))
    storage.write_bytes(f"{url}/images/000099.tar", storage.read_bytes(f"{url}/{shards[0]}"))
    storage.remove(f"{url}/{parts[1]}")
    crawl(s3_config(server.url, url, state))
    now = names(url)
    assert "posts/000099.parquet" not in now and "images/000099.tar" not in now
    got = check_exactly_once(download_tree(url, tmp_path / "copy"), server.board)
    assert got["ids"] == {p.id for p in server.board.posts}
    # the same state pointed at a new, empty bucket: everything is crawled again into it
    s3_server.client().create_bucket(Bucket=bucket[5:] + "-new")
    url2 = f"{bucket}-new/crawl"
    again = crawl(s3_config(server.url, url2, state))
    assert again.failed == 0 and again.images == len(got["samples"])
    assert check_exactly_once(download_tree(url2, tmp_path / "copy2"), server.board)["ids"] == got["ids"]


@pytest.mark.parametrize(
    "out, needle",
    [
        ("s3://no-such-bucket-i2v/crawl", "s3://no-such-bucket-i2v/crawl: cannot write: no such bucket"),
        ("nosuch://bucket/crawl", "nosuch://bucket/crawl: no filesystem knows nosuch:// URLs"),
    ],
)
def test_bad_outputs_are_one_line(s3_server, tmp_path, out, needle):
    cmd = [*I2V, "crawl", "--url", "http://127.0.0.1:9", "--out", out, "--state-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in r.stderr


class DroppingProxy:
    """A TCP proxy to the S3 server that, once `budget` bytes of requests have gone through, drops every
    connection, open or new, mid-request: a network lost for good in the middle of an upload."""

    def __init__(self, target: str, budget: int):
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target, self.budget = (host, int(port)), budget
        self.sent, self.dropped = 0, 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if request:
                    with self.lock:
                        self.sent += len(data)
                        over = self.sent > self.budget
                        self.dropped += over
                    if over:
                        break
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                s.close()

    def close(self) -> None:
        self.listener.close()


def test_a_connection_lost_during_an_upload_is_one_line_and_the_rerun_resumes(
    server, bucket, tmp_path, s3_server, monkeypatch
):
    from s3server import forget_filesystems

    url, state = f"{bucket}/crawl", tmp_path / "state"
    proxy = DroppingProxy(s3_server.endpoint, budget=400_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries, kept short for the test
    forget_filesystems()
    try:
        with pytest.raises(UserError) as info:
            crawl(s3_config(server.url, url, state))
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
        forget_filesystems()
    message = str(info.value)
    assert proxy.dropped and "\n" not in message
    assert message.startswith(url + "/") and "run again to resume" in message, message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    crawl(s3_config(server.url, url, state))
    got = check_exactly_once(download_tree(url, tmp_path / "copy"), server.board)
    assert got["ids"] == {p.id for p in server.board.posts}
    shutil.rmtree(tmp_path / "copy")
