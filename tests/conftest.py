"""Shared test set-up: GPU tests skip themselves without CUDA; a small synthetic crawl, vocabulary and build."""

import os
import sys
from pathlib import Path

import pytest

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.data.build import BuildConfig, build
from illust2vec.data.vocab import build_vocab
from illust2vec.formats.vocab import write_vocab
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board

sys.path.insert(0, str(Path(__file__).parent))  # the tests' own helpers (s3server.py)
from s3server import KEYS, forget_filesystems  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session; AWS_ENDPOINT_URL and test keys point this process and children at it."""
    from s3server import start_s3, use

    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", *KEYS)}
    with start_s3() as server:
        use(server)
        yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    forget_filesystems()


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A new empty bucket on the session's S3 server, as `s3://NAME`."""
    import uuid

    name = "t-" + uuid.uuid4().hex[:12]
    s3_server.client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def synth_crawl(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crawl")
    with start_board(SynthConfig(posts=160, seed=41)) as server:
        cfg = CrawlConfig(url=server.url, out=out, api_rate=200, file_rate=200, backoff=0.01, decoders=2, concurrency=8)
        crawl(cfg)
    return out


@pytest.fixture(scope="session")
def synth_vocab(synth_crawl, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "selected_tags.csv"
    write_vocab(build_vocab([synth_crawl], top={"general": 60, "character": 20, "copyright": 8}), path)
    return path


@pytest.fixture(scope="session")
def synth_build(synth_crawl, synth_vocab, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build")
    build(
        BuildConfig(
            dirs=(synth_crawl,),
            vocab=synth_vocab,
            out=out,
            size=96,
            shard_size=40,
            val_fraction=0.15,
            test_fraction=0.1,
            workers=2,
            format="png",
        )
    )
    return out


@pytest.fixture(scope="session")
def synth_run(synth_build, tmp_path_factory) -> Path:
    """A run of a tiny timm backbone trained for two epochs on synth_build: for evaluate, export and tag tests."""
    from illust2vec.train.config import TrainConfig
    from illust2vec.train.loop import fit

    run = tmp_path_factory.mktemp("run") / "run"
    fit(
        TrainConfig(
            data=str(synth_build),
            out=str(run),
            epochs=2,
            arch="test_resnet",
            batch_size=16,
            workers=0,
            select_by="loss",
        )
    )
    return run


@pytest.fixture(scope="session")
def synth_bundle(synth_run, tmp_path_factory) -> Path:
    """synth_run exported as a bundle with model.onnx (thresholds calibrated on its validation split)."""
    from illust2vec.export import ExportConfig, export

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export(ExportConfig(run=str(synth_run), out=str(out), onnx=True, workers=0))
    return out


@pytest.fixture(scope="session")
def synth_images(tmp_path_factory) -> Path:
    """A folder of 12 images from another synthetic board (held out from training), in their board formats
    (JPEG, PNG, WebP, GIF), named `{id}.{ext}`; `truth.json` beside them maps file name -> the post's tags."""
    import json

    from illust2vec.synth.board import Board

    out = tmp_path_factory.mktemp("images")
    # The training board's seed, hence its cast; posts are generated in order, so those past the 160 of
    # synth_crawl's board were never trained on.
    board = Board(SynthConfig(posts=200, seed=41))
    truth = {}
    for post in [p for p in board.posts[160:] if p.is_image and not p.is_deleted and not p.is_banned][:12]:
        name = f"{post.id}.{post.file_ext}"
        (out / name).write_bytes(board.file(post))
        truth[name] = {"rating": post.rating, **post.tags}
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return out


@pytest.fixture
def i2v(monkeypatch, capsys):
    """Run `i2v ARGS` in this process through the console script's entry point: (exit code, stdout, stderr)."""
    from illust2vec.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["i2v", *args])
        with pytest.raises(SystemExit) as e:
            main()
        out, err = capsys.readouterr()
        return e.value.code, out, err

    return run


@pytest.fixture(scope="session")
def new_build(synth_crawl, tmp_path_factory):
    """The synthetic crawl built with more tags than synth_build (more general tags and characters, an artist head)
    at 64 px, not the model's 96: DATA for extending synth_run."""
    from illust2vec.data.build import BuildConfig, build
    from illust2vec.data.vocab import build_vocab
    from illust2vec.formats.vocab import write_vocab

    root = tmp_path_factory.mktemp("new")
    top = {"general": 70, "character": 24, "copyright": 8, "artist": 3}
    write_vocab(build_vocab([synth_crawl], top=top, artist=True), root / "selected_tags.csv")
    build(
        BuildConfig(
            dirs=(synth_crawl,), vocab=root / "selected_tags.csv", out=root / "ds", size=64, shard_size=40,
            val_fraction=0.15, test_fraction=0.1, workers=2, format="png",
        )
    )  # fmt: skip
    return root / "ds"
