"""`i2v crawl` and `i2v export-csv` from the command line: summaries, exit codes, one-line errors, secrets kept."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from illust2vec.formats.posts import read_posts
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.faults import Faults
from illust2vec.synth.server import start_board

I2V = [sys.executable, "-m", "illust2vec.cli"]
FAST = ["--api-rate", "200", "--file-rate", "200"]


def run(*args, **kw):
    return subprocess.run([*I2V, *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def server():
    with start_board(SynthConfig(posts=40, seed=31), faults=Faults(bad_md5_rate=0.1, seed=1)) as s:
        yield s


@pytest.mark.parametrize(
    "args, needle",
    [
        (["crawl", "--out", "x"], "Missing option '--url'"),
        (["crawl", "--url", "http://127.0.0.1:9", "--out", "x", "--ids", "9-3"], "--ids takes A..B"),
        (["crawl", "--url", "http://127.0.0.1:9", "--out", "x", "--shard", "3/2"], "--shard 3/2"),
        (["crawl", "--url", "http://127.0.0.1:9", "--out", "x", "--image-size", "big"], "--image-size"),
        (["crawl", "--url", "http://127.0.0.1:9", "--out", "x", "--site", "pixiv"], "--site must be one of"),
        (["crawl", "--url", "http://127.0.0.1:9", "--out", "x", "--login", "me"], "API key"),
        (["crawl", "--url", "http://127.0.0.1:9", "--out", "x", "--ray", "--limit", "5"], "drop --ray"),
        (["export-csv", "/nonexistent/crawl"], "no posts/*.parquet"),
    ],
)
def test_mistakes_are_one_line(args, needle, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_a_board_that_refuses_us_stops_the_crawl(tmp_path):
    class Forbidden(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(403)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"Forbidden")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = run("crawl", "--url", f"http://127.0.0.1:{httpd.server_address[1]}", "--out", str(tmp_path / "c"), *FAST)
    finally:
        httpd.shutdown()
    assert r.returncode == 2
    assert "refuses us (HTTP 403" in r.stderr and "Traceback" not in r.stderr


def test_crawl_summary_exit_code_and_secrets(server, tmp_path):
    out = tmp_path / "c"
    env = {"I2V_LOGIN": "someone", "I2V_API_KEY": "SECRET-KEY-42", "PATH": "/usr/bin:/bin"}
    r = run("crawl", "--url", server.url, "--out", str(out), *FAST, env=env)
    assert r.returncode == 1, r.stderr  # the board serves some files whose bytes do not match their md5
    assert "posts failed" in r.stderr and "run the same command again" in r.stderr
    assert r.stdout == ""
    for path in [*out.rglob("*")]:
        if path.is_file():
            assert b"SECRET-KEY-42" not in path.read_bytes(), path
    assert "SECRET-KEY-42" not in r.stderr
    summary = json.loads((out / "crawl.json").read_text())
    assert summary["statuses"]["failed"] > 0 and summary["statuses"]["ok"] > 0
    again = run("crawl", "--url", server.url, "--out", str(out), *FAST, env=env)
    assert again.returncode == 1  # still failing: the same bad bytes
    assert json.loads((out / "crawl.json").read_text())["statuses"] == summary["statuses"]
    csv = run("export-csv", str(out))
    assert csv.returncode == 0 and csv.stdout.splitlines()[0].startswith("id,md5,rating")
    assert len(csv.stdout.splitlines()) == 1 + sum(summary["statuses"].values())


def test_dry_run_counts_and_writes_nothing(server, tmp_path):
    r = run("crawl", "--url", server.url, "--out", str(tmp_path / "c"), "--dry-run", "--limit", "25", *FAST)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert counts["posts"] == 25 and counts["image"] + counts.get("no_file", 0) + counts.get("not_image", 0) == 25
    assert not (tmp_path / "c").exists()


def html_faults(clean: list[int], html: list[int]) -> Faults:
    """API faults whose first seed answers API requests `html` with a challenge page and `clean` for real."""
    for seed in range(100_000):
        f = Faults(html_rate=0.7, paths="api", seed=seed)
        if all(f.fires("html", n) for n in html) and not any(f.fires("html", n) for n in clean):
            return f
    raise AssertionError("no seed fits")


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_persistent_html_pages_stop_in_one_line_and_the_same_command_resumes(i2v, monkeypatch, tmp_path):
    import illust2vec.booru.client as client_module

    monkeypatch.setattr(client_module, "backoff_seconds", lambda *args, **kw: 0.0)
    # The first request (the newest id) is answered; the first page then gets a challenge page all 6 times. The
    # next run's requests are answered again.
    faults = html_faults(clean=[1, 8, 9], html=list(range(2, 8)))
    out = tmp_path / "c"
    with start_board(SynthConfig(posts=40, seed=32), faults=faults) as board:
        board.wait_warm(60)
        code, _, err = i2v("crawl", "--url", board.url, "--out", str(out), *FAST)
        assert code == 2 and "Traceback" not in err, err
        assert error_lines(err) == [
            f"error: 127.0.0.1:{board.port} still answered /posts.json with an HTML page titled 'Just a moment...' "
            "(a challenge or maintenance page?) after 6 attempts; run the same command to resume"
        ]
        assert board.stats["html"] == 6
        code, _, err = i2v("crawl", "--url", board.url, "--out", str(out), *FAST)
        assert code == 0, err
        posts = board.board.posts
    rows = read_posts([out]).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in posts)


@pytest.mark.parametrize(
    ("faults", "sent"),
    [
        (Faults(html_rate=1.0, paths="api"), "It sent an HTML page titled 'Just a moment...'"),
        (Faults(cut_json_rate=1.0, paths="api"), "It sent JSON cut short ("),
    ],
)
def test_a_first_answer_that_is_not_json_blames_the_site_or_url_at_once(i2v, tmp_path, faults, sent):
    with start_board(SynthConfig(posts=10, seed=33), faults=faults, warm=False) as board:
        code, _, err = i2v("crawl", "--url", board.url, "--out", str(tmp_path / "c"), *FAST)
        api = board.stats["api"]
    assert code == 2 and "Traceback" not in err and api == 1  # at once: no retries
    (line,) = error_lines(err)
    assert line.startswith(
        f"error: 127.0.0.1:{board.port}/posts.json did not answer JSON; is --site danbooru right, and --url the "
        "board's address?"
    )
    assert sent in line
