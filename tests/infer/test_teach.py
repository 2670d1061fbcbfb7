"""The teacher pass of i2v distill (infer/teach.py): the soft-target cache, its resume, its bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from illust2vec import Tagger
from illust2vec.errors import UserError
from illust2vec.formats import teacher as cache
from illust2vec.formats.dataset import open_dataset
from illust2vec.formats.shards import iter_samples
from illust2vec.infer.teach import TeachConfig, teach
from onnxfile import export_nhwc


def board_images(out: Path, n: int, seed: int = 41, first: int = 160) -> Path:
    """`n` images of the synthetic board past the training posts (never trained on), as files."""
    from illust2vec.synth.board import Board
    from illust2vec.synth.cast import SynthConfig

    out.mkdir(parents=True, exist_ok=True)
    board = Board(SynthConfig(posts=first + 2 * n, seed=seed))
    posts = [p for p in board.posts[first:] if p.is_image and not p.is_deleted and not p.is_banned][:n]
    for post in posts:
        (out / f"{post.id}.{post.file_ext}").write_bytes(board.file(post))
    return out


def wd_teacher(out: Path, size: int = 64, general: int = 24, characters: int = 6, ratings: bool = True) -> Path:
    """A WD ONNX directory whose outputs follow the picture's colours: the mean colour of each cell of a 4 x 4 grid
    through a fixed random linear layer, sigmoid. Its decisions differ from picture to picture (a random network's
    barely do), and a student can learn them."""
    import torch

    out.mkdir(parents=True)
    rows = [(9, n) for n in ("general", "sensitive", "questionable", "explicit") if ratings]
    rows += [(0, f"tag_{i}") for i in range(general)] + [(4, f"chara_{i}") for i in range(characters)]
    lines = ["tag_id,name,category,count"] + [f"{9999 - i},{n},{c},{100 + i}" for i, (c, n) in enumerate(rows)]
    (out / "selected_tags.csv").write_text("\n".join(lines) + "\n")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(len(rows), 48, generator=g) * 4
    bias = torch.randn(len(rows), generator=g) - 1.0

    class ColourTagger(torch.nn.Module):
        def forward(self, x):
            cells = torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2) / 255 - 0.5, 4).flatten(1)
            z = (cells - cells.mean(dim=1, keepdim=True)) * 4
            return torch.sigmoid(z @ weight.T + bias)

    export_nhwc(ColourTagger(), size, out / "model.onnx")
    return out


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    folder = board_images(tmp_path_factory.mktemp("unlabelled"), 40)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    (folder / "notes.txt").write_text("not an image at all")
    return folder


def cached_samples(root: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a cache's shards by key: its json, its probabilities (not the tar headers' times)."""
    ds = open_dataset(root)
    out = {}
    for split in ("train", "val"):
        for key, files in iter_samples(ds.shards(split), exts=("json", "npy", "jpg")):
            assert key not in out, f"{key} cached twice"
            out[key] = files
    return out


def test_the_cache_is_a_dataset_of_the_teachers_decisions_and_probabilities(synth_bundle, unlabelled, tmp_path):
    cfg = TeachConfig(str(synth_bundle), (str(unlabelled),), size=48, cache=str(tmp_path / "c"), part_size=16)
    s = teach(cfg)
    assert s.finished and s.done == 40 and s.failed["undecodable"] == 1 and s.not_images == 1
    assert s.samples["train"] + s.samples["val"] == 40 and s.samples["val"] >= 1
    ds = open_dataset(tmp_path / "c")
    assert ds.image_size == 48 and ds.samples("val") == s.samples["val"]
    info = cache.read_identity(tmp_path / "c")
    assert info.size == 48 and info.items == 42 and info.weights and info.kind == "bundle"
    tagger = Tagger.load(synth_bundle)
    for files in list(cached_samples(tmp_path / "c").values())[:5]:
        record = json.loads(files["json"])
        probs = cache.decode_probs(files["npy"])
        # the probabilities are the teacher's on that file (float16), its decisions the labels
        assert np.abs(probs - tagger.predict(record["path"])[0]).max() < 2e-3
        chosen = tagger.select(tagger.predict(record["path"])[0])
        general = [tagger.labels.names[tagger.labels.heads["general"][i]] for i in record["labels"]["general"]]
        assert sorted(general) == sorted(chosen["general"])
        assert Image.open(io.BytesIO(files["jpg"])).size == (48, 48)


def test_a_killed_pass_continues_after_its_last_finished_part(synth_bundle, unlabelled, tmp_path):
    whole = TeachConfig(str(synth_bundle), (str(unlabelled),), size=32, cache=str(tmp_path / "whole"), part_size=8)
    teach(whole)
    cut = TeachConfig(
        str(synth_bundle), (str(unlabelled),), size=32, cache=str(tmp_path / "cut"), part_size=8, max_parts=2
    )
    first = teach(cut)
    assert not first.finished and first.done == 16 and not cache.is_finished(tmp_path / "cut")
    # what a kill leaves: a part's shard renamed before its record was written, another half written
    root = tmp_path / "cut"
    shutil.copy(root / "train-000000.tar", root / "train-000002.tar")
    (root / "val-000003.tar.tmp").write_bytes(b"half")
    again = TeachConfig(str(synth_bundle), (str(unlabelled),), size=32, cache=str(root), part_size=8)
    second = teach(again)
    assert second.finished and second.before == 16 and second.done == 24
    assert not list(root.glob("*.tmp"))
    a, b = cached_samples(tmp_path / "whole"), cached_samples(root)
    assert a.keys() == b.keys() and len(a) == 40  # no image twice, none lost
    assert all(a[k] == b[k] for k in a)  # the same outputs, byte for byte
    third = teach(again)  # all done: nothing runs
    assert third.done == 0 and third.before == 40 and third.finished


def test_a_cache_of_another_teacher_or_size_is_refused(synth_bundle, unlabelled, tmp_path):
    teach(
        TeachConfig(str(synth_bundle), (str(unlabelled),), size=32, cache=str(tmp_path / "c"), max_parts=1, part_size=8)
    )
    with pytest.raises(UserError, match="made with another size"):
        teach(TeachConfig(str(synth_bundle), (str(unlabelled),), size=40, cache=str(tmp_path / "c")))


def test_bad_input_is_one_line(synth_bundle, unlabelled, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no files found"):
        teach(TeachConfig(str(synth_bundle), (str(empty),), size=32, cache=str(tmp_path / "a")))
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(next(unlabelled.glob("*.png"), None) or next(unlabelled.glob("*.jpg")), few / "one.img")
    (few / "bad.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="decodable images of 2 files.*needs at least 10"):
        teach(TeachConfig(str(synth_bundle), (str(few),), size=32, cache=str(tmp_path / "b")))
    with pytest.raises(UserError, match="--size"):
        TeachConfig(str(synth_bundle), (str(few),), size=8, cache=str(tmp_path / "c"))


def test_a_wd_onnx_teacher_works_and_one_without_a_rating_is_refused(unlabelled, tmp_path):
    wd = wd_teacher(tmp_path / "wd-colour-tagger-v3")
    s = teach(TeachConfig(str(wd), (str(unlabelled),), size=32, cache=str(tmp_path / "c")))
    assert s.finished and s.done == 40
    info = cache.read_identity(tmp_path / "c")
    assert info.kind == "wd-onnx" and info.image_size == 64 and info.thresholds["heads"]["character"] == 0.85
    labels = [json.loads(f["json"])["labels"] for f in cached_samples(tmp_path / "c").values()]
    assert len({tuple(lab["general"]) for lab in labels}) > 10  # decisions that differ from picture to picture
    norating = wd_teacher(tmp_path / "no-rating", ratings=False)
    with pytest.raises(UserError, match="no rating head"):
        teach(TeachConfig(str(norating), (str(unlabelled),), size=32, cache=str(tmp_path / "d")))
