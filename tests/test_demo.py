"""`i2v demo --quick`: the whole flow on the synthetic board, its report, and the quickstart notebook on its model."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    for _ in range(2):  # a second demo in the same place starts afresh
        r = subprocess.run(
            [sys.executable, "-m", "illust2vec.cli", "demo", "--quick", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_reports_them(quick_demo: Path):
    tmp_path = quick_demo
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


@pytest.mark.slow
def test_the_quickstart_notebook_runs_on_the_demo_model(quick_demo: Path, monkeypatch):
    monkeypatch.setenv("I2V_DEMO", str(quick_demo))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(quick_demo)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "rating:" in text and "general:" in text and "bundle" in text
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert len(images) >= 2  # the show picture and the strip of similar images
    assert (quick_demo / "quickstart-show.png").stat().st_size > 10_000
    similar = [line for line in text.splitlines() if "held-out" in line]
    assert len(similar) == 6 and similar[0].startswith("1.000")  # the query is its own nearest image
