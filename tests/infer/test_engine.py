"""The batch engine of `i2v tag` and `i2v embed`: batches in order, one bad-item policy with one vocabulary of
reasons, non-images passed over, and the one summary line."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from illust2vec.errors import UserError
from illust2vec.infer.captions import CaptionRules
from illust2vec.infer.embed import EmbedConfig
from illust2vec.infer.engine import REASONS, BatchSummary, Engine, decode, discover
from illust2vec.infer.pipeline import TagConfig
from illust2vec.util.images import BadImage


def write_png(path: Path, colour: tuple[int, int, int], size=(20, 10)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    for i in range(7):
        write_png(tmp_path / f"img{i}.png", (10 * i, 0, 0))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "deep.png", (0, 0, 255))
    return tmp_path


def run(folder: Path, batch_size: int, **kw) -> tuple[BatchSummary, list[list[str]], str]:
    summary = BatchSummary("tagged")
    items = discover([str(folder)], recursive=False, summary=summary)
    out = io.StringIO()
    engine = Engine(summary, size=8, console=Console(file=out, width=200), batch_size=batch_size, workers=2, **kw)
    batches: list[list[str]] = []

    def consume(batch):
        assert all(x.shape == (8, 8, 3) and x.dtype == np.float32 for _, x in batch)
        batches.append([item.path.name for item, _ in batch])
        summary.done += len(batch)

    engine.run(items, consume, "tagging")
    return summary, batches, out.getvalue()


def test_batches_in_order_and_bad_files_counted_by_one_vocabulary(folder):
    summary, batches, err = run(folder, batch_size=3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sum(batches, []) == [f"img{i}.png" for i in range(7)]  # sorted, in order, whatever the threads did
    assert summary.done == 7 and summary.failed == {"undecodable": 1, "empty": 1}
    assert set(summary.failed) <= set(REASONS)
    assert summary.not_images == 1 and summary.subfolders_skipped == 1
    assert "broken.jpg: " in err and "empty.png: " in err and "notes.json" not in err
    line = summary.line()
    assert line.startswith("tagged 7 images in ")
    assert "2 failed (1 undecodable, 1 empty)" in line or "2 failed (1 empty, 1 undecodable)" in line
    assert "1 non-image file passed over" in line and "1 subfolder not entered (--recursive)" in line
    assert "rows in the output" not in line  # tag's summary has no output rows


def test_accept_turns_an_item_away_after_decoding(folder):
    summary, batches, _ = run(folder, batch_size=10, accept=lambda item: item.path.name != "img3.png")
    assert "img3.png" not in sum(batches, []) and summary.done == 6


def test_captions_kept_are_not_decoded(folder):
    (folder / "img0.txt").write_text("a caption")
    summary, batches, _ = run(folder, batch_size=10, keep_captions=True)
    assert "img0.png" not in sum(batches, []) and summary.captions_kept == 1
    assert summary.not_images == 2  # notes.json and the caption itself


def test_embed_summary_line_says_resume_and_rows():
    s = BatchSummary("embedded", done=1, already=5, rows=6, seconds=2.0)
    s.failed["too_large"] += 2
    assert s.line() == (
        "embedded 1 image in 2.0 s (0.5 images/s); 5 done before (resumed); 2 failed (2 too large); "
        "6 rows in the output"
    )
    assert s.n_failed == 2


def test_decode_keeps_the_pictures_size_and_refuses_non_images(tmp_path):
    d = decode(write_png(tmp_path / "a.png", (255, 0, 0), size=(30, 12)), 16)
    assert (d.width, d.height) == (30, 12) and d.x.shape == (16, 16, 3)
    assert d.x[8, 8].tolist() == [0.0, 0.0, 255.0]  # BGR: red in the middle
    assert d.x[0, 8].tolist() == [255.0, 255.0, 255.0]  # padded with white
    with pytest.raises(BadImage) as e:
        decode(b"text, not an image", 16)
    assert e.value.reason == "not_image"  # util.images' word; the engine and serve count it as "undecodable"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TagConfig(paths=("a",), model="m", format="xml"), "--format"),
        (lambda: TagConfig(paths=("a",), model="m", batch_size=0), "--batch-size"),
        (lambda: TagConfig(paths=("a",), model="m", shard="3/2"), "--shard"),
        (lambda: TagConfig(paths=("a",), model="m", mcut=True, threshold=0.5), "--mcut"),
        (lambda: TagConfig(paths=("a",), model="m", format="json", rules=CaptionRules(append=True)), "--append"),
        (lambda: TagConfig(paths="a", model="m"), "paths"),
        (lambda: EmbedConfig(paths=("a",), model="m", out="v.parquet", ids="name"), "--ids"),
        (lambda: EmbedConfig(paths=("a",), model="m", out="v.csv"), "Parquet"),
        (lambda: EmbedConfig(paths=("a",), model="m", out="v.parquet", backend="tpu"), "--backend"),
        (lambda: EmbedConfig(paths=("a",), model="m", out="v.parquet", workers=0), "--workers"),
    ],
)
def test_a_bad_config_is_one_user_error_naming_the_option(make, match):
    with pytest.raises(UserError, match=match):
        make()


def test_configs_take_the_shard_as_written_on_the_command_line():
    assert TagConfig(paths=["a"], model="m", shard="1/4").shard == (1, 4)
    assert EmbedConfig(paths=("a",), model="m", out="v.parquet", shard=(2, 3)).shard == (2, 3)
