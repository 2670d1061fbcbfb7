"""`i2v similar` and `i2v dedup` on an index of held-out synthetic images plus planted copies: the JSON shape, the
query first when it is in the index, results equal to brute force, tag filters, near-duplicate groups, and one-line
errors. The model is tiny and barely trained, so nothing here asserts semantic quality beyond copies."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from illust2vec.errors import UserError
from illust2vec.infer.embed import EmbedConfig, embed_files
from illust2vec.infer.preprocess import read_image
from illust2vec.infer.tagger import Tagger
from illust2vec.search import (
    BuildSummary,
    DedupConfig,
    IndexParams,
    SimilarConfig,
    VectorIndex,
    build_index,
    check_model,
    dedup,
    similar,
)
from illust2vec.search.similar import find_duplicates, parse_tag_filter, row_tags


def halved_jpeg(path: Path) -> bytes:
    image = read_image(path)
    image = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    return buf.getvalue()


PLANTED = {"copy_a": "exact copy", "small_b": "half size, JPEG", "reencoded_c": "full size, PNG to JPEG"}


@pytest.fixture(scope="module")
def library(synth_bundle, synth_images, tmp_path_factory) -> dict:
    """The 12 held-out images and three planted copies of three of them, embedded and indexed (flat)."""
    root = tmp_path_factory.mktemp("library")
    folder = root / "images"
    folder.mkdir()
    originals = sorted(p for p in synth_images.iterdir() if p.name != "truth.json")
    for p in originals:
        shutil.copy(p, folder / p.name)
    a, b, c = originals[0], originals[1], next(p for p in originals[2:] if p.suffix == ".png")
    shutil.copy(a, folder / f"copy_a{a.suffix}")
    (folder / "small_b.jpg").write_bytes(halved_jpeg(b))
    buf = io.BytesIO()
    read_image(c).save(buf, "JPEG", quality=90)
    (folder / "reencoded_c.jpg").write_bytes(buf.getvalue())
    tagger = Tagger.load(synth_bundle)
    embed_files(EmbedConfig(paths=(str(folder),), model=str(synth_bundle), out=str(root / "v.parquet")), tagger=tagger)
    build_index([root / "v.parquet"], root / "index", IndexParams(kind="flat"))
    pairs = {a.name: f"copy_a{a.suffix}", b.name: "small_b.jpg", c.name: "reencoded_c.jpg"}
    return {"root": root, "folder": folder, "index": root / "index", "pairs": pairs, "originals": originals}


def test_similar_json_lists_path_id_score_with_the_query_first(i2v, synth_bundle, library):
    query = library["folder"] / library["originals"][0].name  # it has an exact copy: two rows score 1.0
    code, out, err = i2v(
        "similar", str(query), "--index", str(library["index"]), "--model", str(synth_bundle), "--format", "json"
    )
    assert code == 0, err
    hits = json.loads(out)
    assert len(hits) == 10
    assert all(set(h) == {"path", "id", "score"} for h in hits)
    assert hits[0]["path"] == str(query.resolve()) and hits[0]["id"] == query.name
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[1]["id"] == library["pairs"][query.name]  # its exact copy, next
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert len({h["id"] for h in hits}) == 10


def test_similar_equals_brute_force_over_the_stored_vectors(i2v, synth_bundle, library, tmp_path):
    outside = tmp_path / "query.jpg"  # not in the index
    outside.write_bytes(halved_jpeg(library["originals"][5]))
    code, out, err = i2v(
        "similar",
        str(outside),
        "--index",
        str(library["index"]),
        "--model",
        str(synth_bundle),
        "-k",
        "6",
        "--format",
        "json",
    )
    assert code == 0, err
    hits = json.loads(out)
    table = pq.read_table(library["root"] / "v.parquet").to_pylist()
    vectors = np.array([r["vector"] for r in table], np.float32)
    q = Tagger.load(synth_bundle).extract_feature([outside], normalize=True)[0]
    want = np.sort(vectors @ q)[::-1][:6]
    np.testing.assert_allclose([h["score"] for h in hits], want, atol=1e-4)


def test_similar_by_id_and_table_output(i2v, library):
    name = library["originals"][3].name
    code, out, err = i2v("similar", "--id", name, "--index", str(library["index"]), "-k", "4", "--format", "json")
    assert code == 0, err
    hits = json.loads(out)
    assert hits[0]["id"] == name and len(hits) == 4
    code, out, _ = i2v("similar", "--id", name, "--index", str(library["index"]), "-k", "3")
    assert code == 0 and name in out and "score" in out


def test_tag_filters_keep_and_drop_by_predicted_tags(i2v, library):
    index = VectorIndex.load(library["index"])
    sets = [row_tags(t) for t in index.tags]
    counts = {t: sum(t in s for s in sets) for s in sets for t in s}
    tag = next(t for t, n in sorted(counts.items()) if 0 < n < len(sets))  # some images have it, some do not
    have = {i for i, s in zip(index.ids, sets, strict=True) if tag in s}
    query = index.ids[0]
    common = ("--id", query, "--index", str(library["index"]), "-k", "100", "--format", "json")
    code, out, err = i2v("similar", *common, "--tags", tag)
    assert code == 0, err
    assert {h["id"] for h in json.loads(out)} == have
    code, out, err = i2v("similar", *common, "--tags", f"-{tag}")
    assert code == 0, err
    assert {h["id"] for h in json.loads(out)} == set(index.ids) - have
    code, _, err = i2v("similar", *common, "--tags", "no_such_tag_anywhere")
    assert code == 2 and "no_such_tag_anywhere" in err and len(err.strip().splitlines()) == 1


def test_parse_tag_filter():
    assert parse_tag_filter("blue_hair -hat, smile") == ({"blue_hair", "smile"}, {"hat"})
    assert parse_tag_filter(None) == (frozenset(), frozenset())
    assert row_tags(json.dumps({"rating": {"general": 0.9, "explicit": 0.1}, "general": {"hat": 0.5}})) == {
        "general",
        "hat",
    }


def test_dedup_finds_the_planted_copies(i2v, library):
    code, out, err = i2v("dedup", str(library["index"]), "--format", "json")  # the default threshold
    assert code == 0, err
    groups = [{h["id"] for h in g} for g in json.loads(out)]
    for original, copy in library["pairs"].items():
        assert any({original, copy} <= g for g in groups), (original, copy, groups)
    first = json.loads(out)[0]
    assert set(first[0]) == {"path", "id", "score"} and first[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_dedup_groups_copies_and_only_copies(library):
    """At a threshold above every pair of distinct pictures of this tiny model (up to 0.995 on these twelve) and
    below its copies (0.9997 and up), the groups are exactly the planted pairs."""
    groups = find_duplicates(VectorIndex.load(library["index"]), threshold=0.999)
    assert sorted(sorted(h.id for h in g) for g in groups) == sorted(sorted(p) for p in library["pairs"].items())


def test_dedup_table_and_binary_index(i2v, library, tmp_path):
    code, out, err = i2v("dedup", str(library["index"]))
    assert code == 0 and "copy_a" in out and "groups" in err
    build_index([library["root"] / "v.parquet"], tmp_path / "bin", IndexParams(kind="binary"))
    groups = find_duplicates(VectorIndex.load(tmp_path / "bin"), threshold=1.0)  # identical codes only
    assert any(
        {h.id for h in g} == {library["originals"][0].name, library["pairs"][library["originals"][0].name]}
        for g in groups
    )


def test_user_mistakes_are_one_line(i2v, synth_bundle, library, tmp_path):
    index = str(library["index"])
    cases = [
        (("similar", "--id", "x", "--index", str(tmp_path)), "not an index"),
        (("similar", "--index", index), "give an IMAGE or --id"),
        (("similar", str(library["originals"][0]), "--index", index), "--model"),
        (("similar", "--id", "nope", "--index", index), "--id nope: not in the index"),
        (("similar", "--id", library["originals"][0].name, "--index", index, "--format", "xml"), "--format"),
        (("similar", str(tmp_path / "missing.png"), "--index", index, "--model", str(synth_bundle)), "no such image"),
        (("dedup", index, "--threshold", "2"), "--threshold"),
    ]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not an image")
    cases.append((("similar", str(broken), "--index", index, "--model", str(synth_bundle)), "broken.jpg"))
    for args, words in cases:
        code, out, err = i2v(*args)
        assert code == 2, (args, err)
        assert words in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert out == ""


def test_query_with_another_model_is_refused(i2v, synth_bundle, library, tmp_path):
    index = VectorIndex.load(library["index"])
    other = VectorIndex.build(
        index.vectors(np.arange(len(index))),
        index.ids,
        index.paths,
        index.tags,
        IndexParams(kind="flat"),
        {**index.model, "vocab_hash": "0" * 64, "source": "another/bundle"},
    )
    other.save(tmp_path / "other")
    query = str(library["originals"][0])
    code, _, err = i2v("similar", query, "--index", str(tmp_path / "other"), "--model", str(synth_bundle))
    assert code == 2 and "not the model the index was built with" in err


# ---- the library API without a model: search takes the query vector, its configs check themselves


def small_index(tmp_path) -> VectorIndex:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    x[7] = x[3] + 0.05 * rng.standard_normal(16).astype(np.float32)  # a near-copy of row 3 (cosine ~0.9987)
    tags = [json.dumps({"general": {"hat" if i % 2 else "smile": 0.8}}) for i in range(40)]
    index = VectorIndex.build(
        x,
        [f"i{n}" for n in range(40)],
        [f"/img/{n}.png" for n in range(40)],
        tags,
        IndexParams(kind="flat"),
        {"source": "m", "feature_dim": 16, "vocab_hash": "v1", "weights": "w1"},
    )
    index.save(tmp_path / "idx")
    return index


def test_similar_takes_the_query_vector_and_puts_an_indexed_query_first(tmp_path):
    index = small_index(tmp_path)
    q = index.vector("i5")
    hits = similar(SimilarConfig(index=str(tmp_path / "idx"), image="/img/5.png", k=4), query=q)
    assert [h.id for h in hits][0] == "i5" and len(hits) == 4
    outside = similar(SimilarConfig(index="unused", image="/elsewhere.png", k=3), index, q)
    assert [h.id for h in outside] == [h.id for h in hits[:3]]  # the same vector: the same neighbours
    by_id = similar(SimilarConfig(index="unused", id="i5", k=4, tags="hat"), index)
    assert by_id[0].id == "i5" and all(int(h.id[1:]) % 2 == 1 for h in by_id)
    with pytest.raises(UserError, match="needs its vector"):
        similar(SimilarConfig(index="unused", image="/img/5.png"), index)


@pytest.mark.parametrize(
    ("fields", "words"),
    [({}, "give an IMAGE or --id"), ({"image": "a.png", "id": "x"}, "one of them"), ({"id": "x", "k": 0}, "-k")],
)
def test_similar_config_checks_itself(fields, words):
    with pytest.raises(UserError, match=words):
        SimilarConfig(index="idx", **fields)


def test_check_model_compares_the_model_metadata(tmp_path):
    index = small_index(tmp_path)
    check_model(index, {"source": "here", "feature_dim": 16, "vocab_hash": "v1", "weights": "w1"})
    with pytest.raises(UserError, match="gives 8-d vectors, the index holds 16-d"):
        check_model(index, {"feature_dim": 8, "vocab_hash": "v1", "weights": "w1"}, "small")
    for key in ("vocab_hash", "weights"):
        other = {"source": "b", "feature_dim": 16, "vocab_hash": "v1", "weights": "w1", key: "changed"}
        with pytest.raises(UserError, match="^b: not the model the index was built with \\(m\\)"):
            check_model(index, other)


def test_dedup_summary_and_config(tmp_path):
    small_index(tmp_path)
    summary = dedup(DedupConfig(index=str(tmp_path / "idx")))
    assert summary.threshold == 0.99 and summary.images == 40 and summary.copies == 1
    assert [[h["id"] for h in g] for g in summary.as_json()] == [["i3", "i7"]]
    assert summary.line() == "1 groups, 1 copies among 40 images (threshold 0.99)"
    assert dedup(DedupConfig(index=str(tmp_path / "idx"), threshold=0.999)).groups == []
    for bad in (1.5, -2.0):
        with pytest.raises(UserError, match="--threshold is a cosine similarity, between -1 and 1"):
            DedupConfig(index="idx", threshold=bad)
    with pytest.raises(UserError, match="neighbours"):
        DedupConfig(index="idx", neighbours=0)


def test_build_summary_line(tmp_path):
    index = small_index(tmp_path)
    line = BuildSummary(index, "out/idx", 3, 1.23).line()
    assert line == "out/idx: flat index of 40 vectors (16-d) in 1.2 s; 3 rows with an id seen before left out"
    assert BuildSummary(index, "o", 0, 0.0).line() == "o: flat index of 40 vectors (16-d) in 0.0 s"
