"""--batch-size auto (issue 18): a number as given; on a GPU 32; on a CPU chosen by timing the job's first batches
at sizes 1, 2, 4... (`infer.autobatch`), with a stand-in backend whose cost per batch the test sets on a fake clock.
"""

import dataclasses
import io
import json
import shutil
from types import SimpleNamespace

import pytest
from rich.console import Console

from illust2vec.errors import UserError
from illust2vec.infer import autobatch
from illust2vec.infer.autobatch import AutoBatch, measure, resolve_batch_size
from illust2vec.infer.backends import TorchBackend
from illust2vec.infer.pipeline import TagConfig, tag_files
from illust2vec.infer.tagger import Tagger


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Costly:
    """A stand-in onnxruntime session: the real model's outputs, at a cost per batch size that the test sets on the
    fake clock (seconds per image)."""

    def __init__(self, session, clock: FakeClock, per_image: dict[int, float]):
        self.session, self.clock, self.per_image, self.sizes = session, clock, per_image, []
        self.fail_at: int | None = None

    def run(self, names, feed):
        n = len(next(iter(feed.values())))
        self.sizes.append(n)
        if self.fail_at is not None and n >= self.fail_at:
            raise MemoryError(f"no memory for {n} images")
        self.clock.t += n * self.per_image.get(n, 1.0)
        return self.session.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


def costly(tagger: Tagger, clock: FakeClock, per_image: dict[int, float]) -> tuple[Tagger, Costly]:
    session = Costly(tagger.backend.session, clock, per_image)
    return dataclasses.replace(tagger, backend=dataclasses.replace(tagger.backend, session=session)), session


def choose(per_image: dict[int, float], **kw) -> AutoBatch:
    """Drive an AutoBatch as the engine does, on batches costing `per_image[n]` seconds per image."""
    chooser = AutoBatch(**kw)
    for _ in range(100):
        if chooser.chosen is not None:
            break
        n = chooser.size()
        chooser.record(n, n * per_image[n])
    return chooser


def test_the_chooser_keeps_the_fastest_size_per_image():
    # Batching pays up to 4, then costs more: 4 is kept, after timing 8 twice (and nothing larger).
    c = choose({1: 1.0, 2: 0.8, 4: 0.5, 8: 0.6, 16: 0.4, 32: 0.4})
    assert c.chosen == 4 and set(c.timings) == {1, 2, 4, 8} and all(len(t) == 2 for t in c.timings.values())
    # A 448 px model on a CPU: one image a pass is fastest; the climb stops at 2.
    c = choose({1: 1.0, 2: 1.3, 4: 1.2, 8: 0.1, 16: 0.1, 32: 0.1})
    assert c.chosen == 1 and set(c.timings) == {1, 2}
    # A larger batch must be MARGIN faster: 3% is not enough.
    assert choose({1: 1.0, 2: 0.97, 4: 0.9, 8: 0.9, 16: 0.9, 32: 0.9}).chosen == 1
    # Always faster: up to the largest candidate.
    assert choose({n: 1.0 / n for n in autobatch.CANDIDATES}).chosen == 32
    # The first batch at a size pays for its allocations: the faster of the two counts.
    chooser = AutoBatch()
    for n, seconds in ((1, 5.0), (1, 1.0), (2, 2.4), (2, 1.6)):  # 2: 0.8 s per image at best
        chooser.record(n, seconds)
    assert chooser.size() == 4 and chooser.best() == 2


def test_auto_is_a_number_on_a_gpu_and_for_a_fixed_batch_file_and_a_chooser_on_a_cpu():
    gpu = SimpleNamespace(backend=TorchBackend(module=None, device="cuda:0"), image_size=448)
    cpu = SimpleNamespace(backend=TorchBackend(module=None, device="cpu"), image_size=448)
    fixed = SimpleNamespace(backend=SimpleNamespace(fixed_batch=1), image_size=448)
    assert resolve_batch_size("auto", gpu) == autobatch.GPU_BATCH == 32
    assert resolve_batch_size("auto", fixed) == 1
    assert isinstance(resolve_batch_size("auto", cpu), AutoBatch)
    assert resolve_batch_size(8, cpu) == 8


def test_tag_auto_tags_every_image_once_at_the_fastest_size_and_says_which(
    synth_bundle, synth_images, tmp_path, monkeypatch
):
    folder = tmp_path / "images"
    folder.mkdir()
    pictures = sorted(p for p in synth_images.iterdir() if p.suffix != ".json")
    for copy in range(4):  # 48 files: the timed batches (1, 1, 2, 2, 4, 4, 8, 8) and then some
        for p in pictures:
            shutil.copy(p, folder / f"{copy}-{p.name}")
    clock = FakeClock()
    monkeypatch.setattr(autobatch, "time", SimpleNamespace(perf_counter=clock))
    real = Tagger.load(synth_bundle)
    tagger, backend = costly(real, clock, {1: 1.0, 2: 0.8, 4: 0.5, 8: 0.6})
    out = io.StringIO()
    summary = tag_files(
        TagConfig((str(folder),), str(synth_bundle), format="jsonl"), out, Console(file=io.StringIO()), tagger
    )
    paths = [json.loads(line)["path"] for line in out.getvalue().splitlines()]
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir()) and len(set(paths)) == 48
    assert backend.sizes == [1, 1, 2, 2, 4, 4, 8, 8, 4, 4, 4, 4, 2]
    assert summary.done == 48 and summary.batch.startswith("4 (auto: 1: 1 s, 2: 0.8 s, 4: 0.5 s, 8: 0.6 s")
    assert ", batch 4 (auto: " in summary.line()
    fixed = tag_files(
        TagConfig((str(folder),), str(synth_bundle), format="jsonl", batch_size=16),
        io.StringIO(),
        Console(file=io.StringIO()),
        real,
    )
    assert fixed.batch == "16" and ", batch 16;" in fixed.line() + ";"


def test_the_option_takes_auto_or_a_number(tmp_path):
    assert TagConfig(paths=(str(tmp_path),), model="m").batch_size == "auto"
    assert TagConfig(paths=(str(tmp_path),), model="m", batch_size="8").batch_size == 8
    for bad in ("big", 0, "0"):
        with pytest.raises(UserError, match="--batch-size must be auto or at least 1"):
            TagConfig(paths=(str(tmp_path),), model="m", batch_size=bad)


def test_serve_max_batch_auto_is_timed_at_start_up(synth_bundle, monkeypatch):
    from illust2vec.serve.app import ServeConfig, load_state

    assert ServeConfig(model="m", max_batch="8").max_batch == 8
    with pytest.raises(UserError, match="--max-batch must be auto or at least 1"):
        ServeConfig(model="m", max_batch="many")
    clock = FakeClock()
    monkeypatch.setattr(autobatch, "time", SimpleNamespace(perf_counter=clock))
    real = Tagger.load(synth_bundle)
    tagger, backend = costly(real, clock, {1: 1.0, 2: 0.5, 4: 0.6})
    state = load_state(ServeConfig(model=str(synth_bundle)), tagger=tagger)
    assert state.batcher.max_batch == 2 and backend.sizes == [1, 1, 2, 2, 4, 4]
    assert measure(real, 3) == 3
    tagger, backend = costly(real, clock, {1: 1.0, 2: 0.5, 4: 0.4, 8: 0.3})
    backend.fail_at = 16  # out of memory at 16, say: the best size that ran is kept
    assert measure(tagger) == 8 and backend.sizes[-1] == 16
    backend.fail_at = 1  # a model that cannot run at all: 1, and the failure shows on requests
    assert measure(tagger) == 1
    assert load_state(ServeConfig(model=str(synth_bundle), max_batch=5), tagger=real).batcher.max_batch == 5
