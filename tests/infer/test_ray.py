"""`i2v tag --ray` and `i2v embed --ray` on a local Ray cluster of 2 CPUs (started once for the module): the same
records and vectors as the single-process commands (scores within 1e-5), parts written under --out (a folder or an
s3:// prefix), a rerun that skips what finished parts hold, bad items counted as without --ray, and a model actor
killed mid-run whose batch is run again: every input exactly once."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from illust2vec.formats.shards import image_shards
from illust2vec.formats.vectors import read_vectors
from illust2vec.infer.distributed import FAULT_ENV
from illust2vec.infer.embed import EmbedConfig, embed_files
from illust2vec.infer.engine import RayOptions
from illust2vec.infer.pipeline import TagConfig, tag_files
from illust2vec.infer.tagger import Tagger
from illust2vec.util import cluster, storage

pytestmark = pytest.mark.slow

HEADS = ("rating", "general", "character", "copyright")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster of 2 CPUs for the module; each command connects to it instead of starting its own."""
    with cluster.connect(None, num_cpus=2) as info:
        yield info


@pytest.fixture(scope="module")
def inputs(synth_crawl, synth_images, tmp_path_factory) -> Path:
    """A folder: 8 images, one that does not decode, a non-image, and a tar shard of 6 posts (images and .json)."""
    root = tmp_path_factory.mktemp("ray-inputs")
    for p in sorted(synth_images.iterdir())[:8]:
        shutil.copy(p, root / p.name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with tarfile.open(image_shards(synth_crawl)[0]) as src, tarfile.open(root / "posts.tar", "w") as dst:
        for m in [m for m in src if m.isfile()][:12]:
            dst.addfile(m, src.extractfile(m))
    return root


@pytest.fixture(scope="module")
def plain(synth_bundle, inputs) -> dict[str, dict]:
    """The single-process command's records of the inputs, by path."""
    out = io.StringIO()
    cfg = TagConfig((str(inputs),), str(synth_bundle), format="jsonl", threshold=0.0, character_threshold=0.0)
    summary = tag_files(cfg, out=out, console=Console(file=io.StringIO()))
    assert summary.done == 14 and summary.failed == {"undecodable": 1}
    return {r["path"]: r for r in map(json.loads, out.getvalue().splitlines())}


def parts(out: Path | str) -> list[dict]:
    """Every record in the jsonl parts under `out`."""
    return [
        json.loads(line) for p in storage.listing(out, "part-*.jsonl") for line in storage.read_text(p).splitlines()
    ]


def assert_same(records: list[dict], want: dict[str, dict]) -> None:
    """Each input exactly once, scored as the single-process command scores it (within 1e-5)."""
    paths = [r["path"] for r in records]
    assert sorted(paths) == sorted(want) and len(set(paths)) == len(paths)
    for r in records:
        for head in HEADS:
            assert set(r[head]) == set(want[r["path"]][head]), head
            for tag, score in r[head].items():
                assert abs(score - want[r["path"]][head][tag]) <= 1e-5


def tag_on_ray(synth_bundle, inputs, out, **kw) -> tuple:
    console = io.StringIO()
    ray = RayOptions(part_size=kw.pop("part_size", 4), actors=1)
    cfg = TagConfig(
        (str(inputs),), str(synth_bundle), format="jsonl", threshold=0.0, character_threshold=0.0, out=str(out), ray=ray
    )
    return tag_files(replace_cfg(cfg, **kw), console=Console(file=console, width=300)), console.getvalue()


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def test_tag_on_ray_equals_plain_and_a_rerun_skips_finished_parts(ray_cluster, synth_bundle, inputs, plain, tmp_path):
    out = tmp_path / "tags"
    summary, console = tag_on_ray(synth_bundle, inputs, out, batch_size=4)
    assert summary.done == 14 and summary.failed == {"undecodable": 1} and summary.not_images == 6  # the .json records
    assert f"{inputs / 'broken.jpg'}: not a decodable image" in console
    assert_same(parts(out), plain)
    files = storage.listing(out, "part-*.jsonl")
    assert [p.name for p in files] == [f"part-{i:05d}.jsonl" for i in range(4)]  # 14 records, 4 a part
    lost = files[1].read_text().splitlines()
    files[1].unlink()  # as if the run had stopped before this part was written
    again, _ = tag_on_ray(synth_bundle, inputs, out, batch_size=4)
    assert again.done == len(lost) and again.already == 14 - len(lost)
    assert_same(parts(out), plain)
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:05d}.jsonl" for i in (0, 2, 3, 4)]


def test_a_killed_model_actor_is_retried_and_nothing_is_lost_or_doubled(
    ray_cluster, synth_bundle, inputs, plain, tmp_path, monkeypatch
):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")  # the actor dies as its third batch arrives, once
    out = tmp_path / "tags"
    summary, _ = tag_on_ray(synth_bundle, inputs, out, batch_size=2, part_size=3)
    assert marker.exists()  # the fault fired: an actor died mid-run
    assert summary.done == 14 and summary.failed == {"undecodable": 1}
    assert_same(parts(out), plain)


def test_embed_on_ray_to_s3_equals_plain_and_index_build_reads_the_parts(
    ray_cluster, synth_bundle, inputs, bucket, tmp_path
):
    tagger = Tagger.load(synth_bundle)
    local = tmp_path / "plain.parquet"
    embed_files(EmbedConfig((str(inputs),), str(synth_bundle), str(local)), console=Console(file=io.StringIO()))
    out = f"{bucket}/vectors"
    cfg = EmbedConfig((str(inputs),), str(synth_bundle), out, batch_size=4, ray=RayOptions(part_size=5, actors=1))
    summary = embed_files(cfg, console=Console(file=io.StringIO()))
    assert summary.done == 14 and summary.failed == {"undecodable": 1}
    assert [storage.name(p) for p in storage.listing(out)] == [f"part-{i:05d}.parquet" for i in range(3)]
    got, want = read_vectors([out]), read_vectors([local])  # a prefix of parts, as `i2v index build URL` reads it
    assert sorted(got.ids) == sorted(want.ids) and len(got.ids) == 14
    order = [want.ids.index(i) for i in got.ids]
    np.testing.assert_allclose(got.vectors, want.vectors[order], atol=1e-5)
    assert [got.paths[i] for i in range(14)] == [want.paths[j] for j in order]
    assert got.meta["model"]["feature_dim"] == tagger.feature_dim
    again = embed_files(cfg, console=Console(file=io.StringIO()))
    assert (again.done, again.already) == (0, 14)


def test_ray_mistakes_are_one_line(i2v, synth_bundle, inputs, tmp_path):
    for extra in ([], ["--out", str(tmp_path), "--format", "csv"]):  # --format is jsonl by default with --ray
        code, out, err = i2v("tag", str(inputs), "--model", str(synth_bundle), "--ray", *extra)
        assert code == 2 and err.strip() == (
            "error: --ray writes jsonl parts into a folder or prefix: give --format jsonl and --out DIR|URL"
        )
    code, out, err = i2v(
        "embed", str(inputs), "--model", str(synth_bundle), "--ray", "--out", str(tmp_path / "v.parquet")
    )
    assert code == 2 and "--ray writes parts into a folder or prefix" in err
