"""Shared test set-up: GPU tests skip themselves without CUDA; a small synthetic crawl, vocabulary and build."""

from pathlib import Path

import pytest

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.data.build import BuildConfig, build
from illust2vec.data.vocab import build_vocab, write_vocab
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board


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
    from illust2vec.train.loop import TrainConfig, fit

    run = tmp_path_factory.mktemp("run") / "run"
    fit(TrainConfig(data=str(synth_build), out=str(run), epochs=2, arch="test_resnet", batch_size=16, workers=0))
    return run
