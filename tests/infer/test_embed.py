"""`i2v embed`: the vectors Parquet (unit vectors, tags, ids), bad files counted, resume after a stop, --shard parts
that partition the files exactly, and an index built from several shards' outputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from illust2vec.errors import UserError
from illust2vec.formats.vectors import FORMAT, META_KEY, parts_dir, read_vectors, vectors_table
from illust2vec.infer.embed import EmbedConfig, embed_files
from illust2vec.infer.tagger import Tagger
from illust2vec.search import IndexParams, VectorIndex, build_index


@pytest.fixture(scope="module")
def tagger(synth_bundle) -> Tagger:
    return Tagger.load(synth_bundle)


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name != "truth.json")


def copy_images(src: Path, dst: Path, n: int | None = None) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dst / p.name)) for p in images_of(src)[:n]]


def embed(tagger, paths, out: Path, **kw):
    cfg = EmbedConfig(paths=tuple(str(p) for p in paths), model=tagger.source, out=str(out), **kw)
    return embed_files(cfg, tagger=tagger)


def table_of(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


def test_embed_cli_writes_unit_vectors_tags_and_ids(i2v, synth_bundle, synth_images, tagger, tmp_path):
    out = tmp_path / "vectors.parquet"
    code, stdout, err = i2v("embed", str(synth_images), "--model", str(synth_bundle), "--out", str(out))
    assert code == 0, err
    assert stdout == ""  # nothing machine-readable to print: the output is the file
    assert "embedded 12 images" in err and "12 rows" in err
    table = pq.read_table(out)
    assert table.schema.names == ["id", "path", "vector", "tags"]
    assert table.schema.field("vector").type.list_size == tagger.feature_dim
    meta = json.loads(table.schema.metadata[META_KEY])
    assert meta["format"] == FORMAT and meta["model"]["feature_dim"] == tagger.feature_dim
    rows = table_of(out)
    names = [p.name for p in images_of(synth_images)]
    assert sorted(rows) == sorted(names)  # truth.json is no image: not a row, not a failure
    vectors = np.array([r["vector"] for r in rows.values()], np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # the same vectors as the Python API gives for the same files, and the same tags as the tagger selects
    first = images_of(synth_images)[0]
    np.testing.assert_allclose(
        rows[first.name]["vector"], tagger.extract_feature([first], normalize=True)[0], atol=1e-4
    )
    assert rows[first.name]["path"] == str(first.resolve())
    tags = json.loads(rows[first.name]["tags"])
    want = tagger.select(tagger.predict([first])[0])
    assert set(tags) == set(want) and {h: list(v) for h, v in tags.items()} == {h: list(v) for h, v in want.items()}
    assert len(tags["rating"]) == len(tagger.labels.heads["rating"])
    assert not parts_dir(out).exists()  # merged and cleaned up


def test_ids_stem_gives_post_ids(synth_images, tagger, tmp_path):
    out = tmp_path / "v.parquet"
    embed(tagger, [synth_images], out, ids="stem")
    assert sorted(table_of(out)) == sorted(p.stem for p in images_of(synth_images))


def test_bad_file_is_reported_counted_and_skipped(i2v, synth_bundle, synth_images, tmp_path):
    folder = tmp_path / "imgs"
    copy_images(synth_images, folder, 4)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "v.parquet"
    code, _, err = i2v("embed", str(folder), "--model", str(synth_bundle), "--out", str(out))
    assert code == 1
    assert "broken.jpg" in err and "1 failed" in err and "embedded 4 images" in err
    assert sorted(table_of(out)) == sorted(p.name for p in images_of(synth_images)[:4])


def test_resume_skips_what_is_done(synth_images, tagger, tmp_path):
    folder = tmp_path / "imgs"
    copy_images(synth_images, folder, 5)
    out = tmp_path / "v.parquet"
    first = embed(tagger, [folder], out)
    assert (first.done, first.already, first.rows) == (5, 0, 5)
    before = table_of(out)
    copy_images(synth_images, folder)  # the folder grows: 7 new images
    second = embed(tagger, [folder], out)
    assert (second.done, second.already, second.rows) == (7, 5, 12)
    after = table_of(out)
    assert len(after) == 12
    for key, row in before.items():  # rows done before are kept as they were
        assert after[key]["vector"] == row["vector"]


def test_resume_after_a_stop_keeps_the_written_parts(synth_images, tagger, tmp_path):
    """A run stopped after writing a part (and before merging): the rerun embeds only the rest."""
    folder = tmp_path / "imgs"
    copy_images(synth_images, folder)
    out = tmp_path / "v.parquet"
    embed(tagger, [copy for copy in images_of(folder)[:5]], tmp_path / "partial.parquet")
    parts_dir(out).mkdir()
    shutil.move(tmp_path / "partial.parquet", parts_dir(out) / "part-000000.parquet")
    summary = embed(tagger, [folder], out, part_size=3)
    assert (summary.already, summary.done, summary.rows) == (5, 7, 12)
    assert sorted(table_of(out)) == sorted(p.name for p in images_of(folder))
    assert not parts_dir(out).exists()


def test_shards_partition_the_files_and_the_index_takes_them_together(synth_images, tagger, tmp_path):
    full = tmp_path / "all.parquet"
    embed(tagger, [synth_images], full)
    outs = [tmp_path / f"shard{i}.parquet" for i in range(3)]
    for i, out in enumerate(outs):
        embed(tagger, [synth_images], out, shard=(i, 3))
    parts = [set(table_of(o)) for o in outs]
    assert sum(len(p) for p in parts) == 12 and set().union(*parts) == set(table_of(full))
    assert sum(1 for p in parts if p) >= 2  # a real split, not everything in one shard
    built = build_index([str(o) for o in outs], tmp_path / "index", IndexParams())
    index, duplicates = built.index, built.duplicates
    assert duplicates == 0 and len(index) == 12
    loaded = VectorIndex.load(tmp_path / "index")
    want = table_of(full)
    for id_ in loaded.ids:
        np.testing.assert_allclose(loaded.vector(id_), want[id_]["vector"], atol=1e-6)
    assert loaded.model["feature_dim"] == tagger.feature_dim
    # the same file twice: its rows once, and the count of those left out
    built = build_index([str(outs[0]), str(full)], tmp_path / "index2", IndexParams())
    index, duplicates = built.index, built.duplicates
    assert len(index) == 12 and duplicates == len(parts[0])


def test_index_build_cli_from_shards(i2v, synth_images, tagger, tmp_path):
    outs = [tmp_path / f"s{i}.parquet" for i in range(2)]
    for i, out in enumerate(outs):
        embed(tagger, [synth_images], out, shard=(i, 2))
    code, _, err = i2v("index", "build", *map(str, outs), "--out", str(tmp_path / "idx"), "--kind", "binary")
    assert code == 0, err
    assert "binary index of 12 vectors" in err
    assert VectorIndex.load(tmp_path / "idx").kind == "binary"


def test_vectors_of_two_models_do_not_mix(synth_images, tagger, tmp_path):
    ours = tmp_path / "ours.parquet"
    embed(tagger, [synth_images], ours)
    meta = {"format": FORMAT, "format_version": 1, "model": {"feature_dim": 4, "vocab_hash": "other"}}
    other = tmp_path / "other.parquet"
    pq.write_table(vectors_table(["x"], ["/x.png"], np.ones((1, 4), np.float32), ["{}"], meta), other)
    with pytest.raises(UserError, match="another model"):
        read_vectors([ours, other])
    with pytest.raises(UserError, match="another model"):  # nor can a rerun add to a file of another model
        embed_files(EmbedConfig(paths=(str(synth_images),), model="", out=str(other)), tagger=tagger)


def test_a_retrained_model_with_the_same_vocabulary_is_another_model(synth_bundle, synth_images, tmp_path):
    from safetensors.numpy import load_file, save_file

    retrained = tmp_path / "retrained"
    shutil.copytree(synth_bundle, retrained)
    weights = load_file(retrained / "model.safetensors")
    name = next(k for k in weights if k.endswith("weight") and weights[k].ndim == 4)
    weights[name] = weights[name] * 1.5
    save_file(weights, retrained / "model.safetensors")
    (retrained / "model.onnx").unlink()
    out = tmp_path / "v.parquet"
    embed_files(EmbedConfig(paths=(str(synth_images),), model=str(synth_bundle), out=str(out)))
    with pytest.raises(UserError, match="another model"):  # resuming with it would mix two models' vectors
        embed_files(EmbedConfig(paths=(str(synth_images),), model=str(retrained), out=str(out)))


def test_user_mistakes_are_one_line(i2v, synth_bundle, synth_images, tmp_path):
    code, _, err = i2v(
        "embed", str(tmp_path / "nope"), "--model", str(synth_bundle), "--out", str(tmp_path / "v.parquet")
    )
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope'}: no such file or folder"
    code, _, err = i2v("embed", str(synth_images), "--model", str(synth_bundle), "--out", str(tmp_path / "v.csv"))
    assert code == 2 and "name it *.parquet" in err and len(err.strip().splitlines()) == 1
    code, _, err = i2v("embed", str(synth_images), "--model", str(synth_bundle), "--out", "x.parquet", "--shard", "3/2")
    assert code == 2 and "--shard" in err and len(err.strip().splitlines()) == 1
    code, _, err = i2v("index", "build", str(synth_images / "truth.json"), "--out", str(tmp_path / "idx"))
    assert code == 2 and "not a Parquet file" in err and len(err.strip().splitlines()) == 1
    # two folders whose files share relative paths would share ids
    a, b = tmp_path / "a", tmp_path / "b"
    copy_images(synth_images, a, 2)
    copy_images(synth_images, b, 2)
    code, _, err = i2v("embed", str(a), str(b), "--model", str(synth_bundle), "--out", str(tmp_path / "v.parquet"))
    assert code == 2 and "would both have the id" in err
