"""`i2v tag` and `i2v embed` over WebDataset tar shards (a crawl's own `images/*.tar`): each image member is an item
named `SHARD/MEMBER`, scored as the same image unpacked as a file; `--out FILE` for tag; truncated and corrupt
shards counted as bad items, never a traceback; `--shard I/N` over members."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from illust2vec.formats.shards import image_shards
from illust2vec.infer.embed import EmbedConfig, embed_files
from illust2vec.infer.engine import BatchSummary, Engine, discover
from illust2vec.infer.tagger import Tagger

ALL = ["--threshold", "0", "--character-threshold", "0"]  # every general and character tag, with its score


@pytest.fixture(scope="module")
def tagger(synth_bundle) -> Tagger:
    return Tagger.load(synth_bundle)


@pytest.fixture(scope="module")
def shard(synth_crawl) -> Path:
    """The crawl's first raw image shard: `{md5}.{ext}` images and `{md5}.json` records."""
    return image_shards(synth_crawl)[0]


def unpack(shard: Path, folder: Path) -> list[str]:
    """The shard's members as files in `folder`; their names, in the shard's order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    with tarfile.open(shard) as tar:
        for m in tar:
            if m.isfile():
                (folder / m.name).write_bytes(tar.extractfile(m).read())
                names.append(m.name)
    return names


def records(text: str) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, text.splitlines())}


def assert_same_scores(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for head in ("rating", "general", "character", "copyright"):
        assert set(a[head]) == set(b[head]), head
        for tag, score in a[head].items():
            assert abs(score - b[head][tag]) <= 1e-5, (head, tag, score, b[head][tag])


def test_tag_over_a_crawls_shard_scores_as_the_unpacked_files(i2v, synth_bundle, shard, tmp_path):
    names = unpack(shard, tmp_path / "files")
    images = [n for n in names if not n.endswith(".json")]
    assert len(images) >= 20 and len(names) == 2 * len(images)  # each post: its image and its .json
    code, out, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", "jsonl", *ALL)
    assert code == 0, err
    from_shard = records(out)
    assert list(from_shard) == [f"{shard}/{n}" for n in images]  # SHARD/MEMBER, in the shard's order
    assert f"tagged {len(images)} images" in err and f"{len(images)} non-image files passed over" in err
    code, out, err = i2v("tag", str(tmp_path / "files"), "--model", str(synth_bundle), "--format", "jsonl", *ALL)
    assert code == 0, err
    from_files = records(out)
    for n in images:
        a, b = from_shard[f"{shard}/{n}"], from_files[str(tmp_path / "files" / n)]
        assert_same_scores({k: v for k, v in a.items() if k != "path"}, {k: v for k, v in b.items() if k != "path"})


def test_a_crawl_directory_with_recursive_finds_its_shards(synth_crawl, shard):
    items = discover([str(synth_crawl)], recursive=True)
    members = [it for it in items if it.shard is not None]
    assert members and all(it.shard in image_shards(synth_crawl) for it in members)
    first = members[0]
    assert str(first.path).startswith(f"{shard}/") and first.key.startswith("images/000000.tar/")
    summary = BatchSummary("tagged")
    assert not [it for it in discover([str(synth_crawl)], recursive=False, summary=summary) if it.shard]
    assert summary.subfolders_skipped >= 1  # images/ is not entered without --recursive


def test_embed_over_a_shard_matches_the_files_and_resumes(shard, tagger, tmp_path):
    names = [n for n in unpack(shard, tmp_path / "files") if not n.endswith(".json")]
    out = tmp_path / "shard.parquet"
    cfg = EmbedConfig(paths=(str(shard),), model=tagger.source, out=str(out))
    first = embed_files(cfg, tagger=tagger)
    assert (first.done, first.rows, first.n_failed) == (len(names), len(names), 0)
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == sorted(f"{shard.name}/{n}" for n in names)  # ids: SHARD/MEMBER, relative as for files
    assert rows[f"{shard.name}/{names[0]}"]["path"] == f"{shard.resolve()}/{names[0]}"
    files_out = tmp_path / "files.parquet"
    embed_files(EmbedConfig(paths=(str(tmp_path / "files"),), model=tagger.source, out=str(files_out)), tagger=tagger)
    files = {r["id"]: r for r in pq.read_table(files_out).to_pylist()}
    for n in names:
        np.testing.assert_allclose(rows[f"{shard.name}/{n}"]["vector"], files[n]["vector"], atol=1e-5)
    again = embed_files(cfg, tagger=tagger)  # a rerun skips every member already written
    assert (again.done, again.already, again.rows) == (0, len(names), len(names))


def test_out_file_equals_stdout_and_is_renamed_into_place(i2v, synth_bundle, shard, tmp_path):
    for fmt in ("jsonl", "csv", "json"):
        code, stdout, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", fmt)
        assert code == 0, err
        target = tmp_path / f"tags.{fmt}"
        code, nothing, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", fmt, "--out", str(target))
        assert code == 0, err
        assert nothing == "" and target.read_text(encoding="utf-8") == stdout
        assert err.strip().splitlines()[-1].startswith(f"{target}: tagged ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tags.csv", "tags.json", "tags.jsonl"]  # no .tmp left


def test_out_and_txt_mistakes_are_one_line(i2v, synth_bundle, shard, tmp_path):
    code, out, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--out", str(tmp_path / "t.txt"))
    assert (
        code == 2
        and out == ""
        and err.strip() == "error: --out writes records: give --format json, jsonl, csv, not table"
    )
    code, out, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", "txt")
    assert code == 2 and out == ""
    assert err.strip() == (
        f"error: {shard}: a tar shard; --format txt writes beside image files only "
        "(give --format jsonl --out FILE for its members)"
    )
    code, _, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", "jsonl", "--out", str(tmp_path))
    assert code == 2 and err.strip().startswith(f"error: --out {tmp_path}: is a folder")
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_run_leaves_no_out_file(synth_bundle, shard, tagger, tmp_path):
    from illust2vec.infer.pipeline import TagConfig, tag_files

    target = tmp_path / "tags.jsonl"
    calls = 0

    def run(x):  # the model fails on the second batch
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real(x)

    real, tagger.run = tagger.run, run
    try:
        with pytest.raises(KeyboardInterrupt):
            tag_files(
                TagConfig((str(shard),), str(synth_bundle), format="jsonl", batch_size=4, out=target), tagger=tagger
            )
    finally:
        tagger.run = real
    assert list(tmp_path.iterdir()) == []  # neither tags.jsonl nor its .tmp


def test_half_truncated_shard_is_counted_never_a_traceback(i2v, synth_bundle, shard, tmp_path):
    cut = tmp_path / "cut.tar"
    data = shard.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    code, out, err = i2v("tag", str(cut), "--model", str(synth_bundle), "--format", "jsonl", *ALL)
    assert code == 1 and "Traceback" not in err
    assert f"{cut}: cut short at {len(data) // 2} bytes" in err and "corrupt" in err.strip().splitlines()[-1]
    code, full, _ = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", "jsonl", *ALL)
    whole = {p.replace(str(shard), str(cut)): r for p, r in records(full).items()}
    assert len(records(out)) >= len(whole) // 3  # the members before the cut are tagged, not lost with the shard
    for path, record in records(out).items():  # what could be read of the cut shard scores as the whole one does
        assert_same_scores({**record, "path": None}, {**whole[path], "path": None})


def test_not_a_tar_is_one_failure_and_a_corrupt_member_one_bad_item(i2v, synth_bundle, shard, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "junk.tar").write_bytes(b"this is no tar at all" * 100)
    good = {n: b for n, b in _members(shard)[:6] if not n.endswith(".json")}
    with tarfile.open(folder / "mixed.tar", "w") as tar:
        for name, body in [*good.items(), ("broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("notes.txt", b"hi")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    code, out, err = i2v("tag", str(folder), "--model", str(synth_bundle), "--format", "jsonl")
    assert code == 1 and "Traceback" not in err
    assert f"{folder / 'junk.tar'}: not a readable tar (" in err
    assert f"{folder / 'mixed.tar' / 'broken.jpg'}: not a decodable image" in err
    assert sorted(records(out)) == sorted(str(folder / "mixed.tar" / n) for n in good)
    last = err.strip().splitlines()[-1]
    assert f"tagged {len(good)} images" in last and "2 failed (1 corrupt, 1 undecodable)" in last
    assert "1 non-image file passed over" in last


def test_a_shard_cut_while_being_read_fails_the_members_cut_short(shard, tmp_path):
    """Members listed before the shard was cut (a broken stream, a half-copied file) fail as cut short."""
    copy = tmp_path / "s.tar"
    copy.write_bytes(shard.read_bytes())
    items = [it for it in discover([str(copy)], recursive=False) if not it.path.name.endswith(".json")]
    keep = items[len(items) // 2].member.offset + 10  # cut inside the middle image
    with open(copy, "r+b") as f:
        f.truncate(keep)
    summary, console = BatchSummary("tagged"), io.StringIO()
    engine = Engine(summary, 32, Console(file=console, width=300), batch_size=8, workers=2)
    done: list[Path] = []

    def consume(batch):
        done.extend(it.path for it, _ in batch)
        summary.done += len(batch)

    engine.run(items, consume, "tagging")
    assert done == [it.path for it in items[: len(items) // 2]]
    assert summary.failed == {"corrupt": len(items) - len(done)}
    assert f"{items[len(items) // 2].path}: cut short: 10 of " in console.getvalue()


def test_shard_parts_cover_every_member_once(i2v, synth_bundle, shard):
    code, out, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", "jsonl")
    assert code == 0, err
    everything = list(records(out))
    parts = []
    for i in range(3):
        code, out, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", "jsonl", "--shard", f"{i}/3")
        assert code == 0, err
        parts.append(list(records(out)))
    assert all(parts) and sum(len(p) for p in parts) == len(everything)
    assert sorted(sum(parts, [])) == sorted(everything)


def _members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
