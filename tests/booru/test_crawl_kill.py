"""Kill `i2v crawl` with SIGKILL at random moments, run it again: every post and image exactly once."""

import random
import signal
import subprocess
import sys
import time

import pytest

from illust2vec.formats.posts import read_posts
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.faults import Faults
from illust2vec.synth.server import start_board

from .test_crawl import check_exactly_once


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume(tmp_path):
    faults = Faults(error_rate=0.1, truncate_rate=0.05, rate_limit=60, seed=5)
    out = tmp_path / "crawl"
    with start_board(SynthConfig(posts=160, seed=23), faults=faults) as server:
        server.wait_warm(120)
        cmd = [sys.executable, "-m", "illust2vec.cli", "crawl", "--url", server.url, "--out", str(out)]
        cmd += ["--api-rate", "100", "--file-rate", "100", "--shard-size", "7", "--concurrency", "8"]
        rng = random.Random(7)
        kills = 0
        for _ in range(5):
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.0, 4.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        board = server.board
    assert kills >= 2, "the crawl finished before it could be killed; give it more posts"
    assert final.returncode == 0, final.stderr[-2000:]
    got = check_exactly_once(out, board)
    assert got["ids"] == {p.id for p in board.posts}
    images = [p for p in board.posts if p.is_image and not (p.is_deleted or p.is_banned)]
    assert len(got["samples"]) == len(images)
    statuses = read_posts([out], ["status"]).column("status").to_pylist()
    assert statuses.count("ok") == len(images)
