"""The `i2v` command line: its conventions (stdout for data, one-line errors) and its entry points."""

import subprocess
import sys
import time

import httpx
import pytest

I2V = [sys.executable, "-m", "illust2vec.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*I2V, *args], capture_output=True, text=True, timeout=300, **kw)


def test_version_goes_to_stdout():
    r = run("version")
    assert r.returncode == 0
    assert r.stdout.strip().count(".") == 2 and r.stderr == ""


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--bogus"], "No such option: --bogus"),
        (["fakebooru", "serve", "--posts", "0"], "--posts"),
        (["fakebooru", "serve", "--port", "notaport"], "--port"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_a_users_mistake_is_one_line_and_exit_2(args, needle):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_fakebooru_serve_prints_its_url_first_and_answers():
    proc = subprocess.Popen(
        [*I2V, "fakebooru", "serve", "--posts", "60", "--seed", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        t0 = time.monotonic()
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        posts = httpx.get(f"{url}/posts.json", params={"limit": 5}, timeout=30).json()
        assert time.monotonic() - t0 < 60
        assert len(posts) == 5 and posts[0]["id"] > posts[-1]["id"]
        assert {"tag_string_general", "tag_string_character", "rating", "md5"} <= set(posts[0])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
