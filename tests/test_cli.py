"""The `i2v` command line: its conventions (stdout for data, one-line errors) and its entry points."""

import json
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_reports_them(tmp_path: Path):
    for _ in range(2):  # a second demo in the same place starts afresh
        r = run("demo", "--quick", "--out", str(tmp_path))
        assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["crawl", "vocab", "build", "train", "evaluate", "export", "tag", "embed+index+similar"]
    statuses = stages["crawl"]["statuses"]
    assert sum(statuses.values()) == 300 and statuses.get("failed", 0) == 0 and statuses["ok"] >= 250
    assert stages["vocab"]["rating tags"] == 4 and stages["vocab"]["general tags"] > 20
    assert stages["build"]["train"] + stages["build"]["val"] + stages["build"]["test"] == statuses["ok"]
    assert stages["train"]["best epoch"] in (1, 2)
    assert 0 < summary["metrics"]["general"]["mAP"] <= 1 and 0 <= summary["metrics"]["character"]["top1"] <= 1
    assert stages["export"]["ONNX vs torch"] and (tmp_path / "bundle" / "model.onnx").stat().st_size > 1e6
    records = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    held_out = [p for p in (tmp_path / "held-out").iterdir()]
    assert len(records) == stages["tag"]["images"] == len(held_out) >= 40 and stages["tag"]["failed"] == 0
    assert all({"path", "rating", "general", "character", "copyright"} <= set(r) for r in records)
    assert all(abs(sum(r["rating"].values()) - 1) < 1e-3 for r in records)
    assert stages["embed+index+similar"]["vectors"] == len(records)
    for key in ("character", "series"):
        assert 0 <= summary["search"][key] <= 1
    # The report shows every stage's results, its pictures inlined.
    page = (tmp_path / "report.html").read_text()
    for stage in stages:
        assert f"<td>{stage}</td>" in page
    assert "Training curves</h2><img src='data:image/png;base64," in page
    assert page.count("<div class='example'>") == 12 and page.count("data:image/jpeg;base64,") >= 12 + 6 * 9
    assert "<td>general</td>" in page and "<td>character</td>" in page
    assert page.count("<div class='row'>") == 6 and "precision@10 (character)" in page
    assert (tmp_path / "contact-sheet.jpg").stat().st_size > 10_000
