"""`i2v tag` on a bundle trained on the synthetic board: every output format, thresholds and MCut, captions and their
options, bad files reported and counted, files recognised by content, --recursive, --shard, and the ONNX path that
never imports torch."""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from illust2vec.formats.bundle import open_bundle, split_vocab
from illust2vec.formats.vocab import Vocab, write_vocab
from illust2vec.infer.engine import discover
from illust2vec.infer.pipeline import parse_exclude
from illust2vec.infer.writers import CSV_COLUMNS, KAOMOJIS, CaptionOptions
from illust2vec.util.shard import in_shard

I2V = [sys.executable, "-m", "illust2vec.cli"]
ALL = ["--threshold", "0", "--character-threshold", "0"]  # every general and character tag, with its score


def subprocess_i2v(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*I2V, *args], capture_output=True, text=True, timeout=300, **kw)


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name != "truth.json")


def copy_images(src: Path, dst: Path, n: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dst / p.name)) for p in images_of(src)[:n]]


@pytest.fixture(scope="module")
def scores(synth_bundle, synth_images) -> dict[str, dict]:
    """Path -> record with every general and character tag's score (json through the CLI, in a subprocess)."""
    r = subprocess_i2v("tag", str(synth_images), "--model", str(synth_bundle), "--format", "json", *ALL)
    assert r.returncode == 0, r.stderr
    return {rec["path"]: rec for rec in json.loads(r.stdout)}


def check_head_order(record: dict) -> None:
    for head in ("rating", "general", "character", "copyright"):
        values = list(record[head].values())
        assert all(0.0 <= v <= 1.0 for v in values), (head, values)
        assert values == sorted(values, reverse=True), (head, values)


def test_json_one_record_per_image_with_the_bundles_thresholds(i2v, synth_bundle, synth_images, scores):
    code, out, err = i2v("tag", str(synth_images), "--model", str(synth_bundle), "--format", "json")
    assert code == 0, err
    records = json.loads(out)
    images = images_of(synth_images)
    assert [r["path"] for r in records] == [str(p) for p in images] and len(images) == 12
    info = open_bundle(synth_bundle)
    rating_tags = set(info.vocab.head_names("rating"))
    for rec in records:
        assert list(rec) == ["path", "rating", "general", "character", "copyright"]
        check_head_order(rec)
        assert set(rec["rating"]) == rating_tags  # rating lists every class
        full = scores[rec["path"]]
        for head in ("general", "character"):
            base = info.thresholds.heads[head]
            expected = {t for t, s in full[head].items() if s >= info.thresholds.tags.get(t, base)}
            assert set(rec[head]) == expected, head
            assert all(abs(rec[head][t] - full[head][t]) < 1e-6 for t in rec[head])
    # truth.json is no image and no failure: counted apart, quietly
    assert "truth.json" not in err and "tagged 12 images" in err and "1 non-image file passed over" in err


def test_thresholds_given_replace_the_bundles(i2v, synth_bundle, synth_images, scores):
    args = ["--threshold", "0.2", "--character-threshold", "0.05", "--format", "jsonl"]
    code, out, err = i2v("tag", str(synth_images), "--model", str(synth_bundle), *args)
    assert code == 0, err
    for rec in map(json.loads, out.splitlines()):
        full = scores[rec["path"]]
        assert set(rec["general"]) == {t for t, s in full["general"].items() if s >= 0.2}
        assert set(rec["character"]) == {t for t, s in full["character"].items() if s >= 0.05}


def mcut(values) -> float:
    p = sorted(values, reverse=True)
    gaps = [a - b for a, b in zip(p, p[1:], strict=False)]
    t = gaps.index(max(gaps))
    return (p[t] + p[t + 1]) / 2


def test_mcut_as_the_wd_space_does_it(i2v, synth_bundle, synth_images, scores):
    code, out, err = i2v("tag", str(synth_images), "--model", str(synth_bundle), "--mcut", "--format", "jsonl")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 12
    for rec in records:
        full = scores[rec["path"]]
        general = mcut(full["general"].values())
        character = max(0.15, mcut(full["character"].values()))
        assert set(rec["general"]) == {t for t, s in full["general"].items() if s >= general}
        assert set(rec["character"]) == {t for t, s in full["character"].items() if s >= character}
    code, _, err = i2v("tag", str(synth_images), "--model", str(synth_bundle), "--mcut", "--threshold", "0.3")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --mcut")


def test_jsonl_and_csv_carry_the_same_records_as_json(i2v, synth_bundle, synth_images, scores):
    base = ["tag", str(synth_images), "--model", str(synth_bundle), *ALL]
    code, out, err = i2v(*base, "--format", "jsonl")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 12
    assert {json.loads(line)["path"]: json.loads(line) for line in lines} == scores

    code, out, err = i2v(*base, "--format", "csv")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 13
    for row in rows[1:]:
        cell = dict(zip(CSV_COLUMNS, row, strict=True))
        rec = scores[cell["path"]]
        top, score = next(iter(rec["rating"].items()))
        assert cell["rating"] == top and float(cell["rating_score"]) == pytest.approx(score)
        for head in ("general", "character", "copyright"):
            assert (cell[head].split(", ") if cell[head] else []) == list(rec[head])


def test_table_names_each_image(i2v, synth_bundle, synth_images):
    code, out, err = i2v("tag", str(synth_images), "--model", str(synth_bundle))
    assert code == 0, err
    assert all(p.name in out for p in images_of(synth_images))
    assert "character" in out.splitlines()[1] and "tagged 12 images" in err


def test_txt_captions_beside_images_kept_unless_overwrite(i2v, synth_bundle, synth_images, scores, tmp_path):
    copies = copy_images(synth_images, tmp_path, 3)
    code, out, err = i2v("tag", str(tmp_path), "--model", str(synth_bundle), "--format", "txt", *ALL)
    assert code == 0 and out == "", err
    for image, original in zip(copies, images_of(synth_images), strict=False):
        text = image.with_suffix(".txt").read_text()
        rec = scores[str(original)]
        assert text == ", ".join([*rec["character"], *rec["copyright"], *rec["general"]]) + "\n"
    before = {p: p.with_suffix(".txt").read_text() for p in copies}

    # Run again with other options: the captions stay and their images are skipped (unchanged since this tool wrote
    # their captions, as its catalogue says), the .txt files are no images.
    code, _, err = i2v("tag", str(tmp_path), "--model", str(synth_bundle), "--format", "txt", "--rating-first")
    assert code == 0, err
    assert {p: p.with_suffix(".txt").read_text() for p in copies} == before
    assert "3 unchanged since tagged" in err and "tagged 0 images" in err and "3 non-image files passed over" in err
    # Captions this tool did not write are skipped too (without --overwrite or --append).
    (tmp_path / ".i2v-catalogue.sqlite").unlink()
    code, _, err = i2v("tag", str(tmp_path), "--model", str(synth_bundle), "--format", "txt", "--rating-first")
    assert {p: p.with_suffix(".txt").read_text() for p in copies} == before
    assert "3 skipped: caption exists" in err and "tagged 0 images" in err, err

    txt = ["--format", "txt", "--overwrite", "--rating-first"]
    code, _, err = i2v("tag", str(tmp_path), "--model", str(synth_bundle), *txt)
    assert code == 0, err
    for image, original in zip(copies, images_of(synth_images), strict=False):
        tags = image.with_suffix(".txt").read_text().strip().split(", ")
        assert tags[0] == next(iter(scores[str(original)]["rating"]))


def renamed_bundle(bundle: Path, out: Path, renames: dict[str, str]) -> Path:
    """A copy of the bundle whose vocabulary names some tags otherwise (the hash in config.json updated to match)."""
    shutil.copytree(bundle, out)
    info = open_bundle(out)
    v = info.vocab
    vocab = Vocab(v.tag_ids, tuple(renames.get(n, n) for n in v.names), v.categories, v.counts)
    wd, extra = split_vocab(vocab)  # bundle format 2: WD's heads, then the others
    write_vocab(wd, out / "selected_tags.csv")
    write_vocab(extra, out / "extra_tags.csv")
    config = json.loads((out / "config.json").read_text())
    config["vocab_hash"] = vocab.hash
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_caption_options(i2v, synth_bundle, synth_images, tmp_path):
    names = open_bundle(synth_bundle).vocab.head_names("general")
    renames = {names[0]: "^_^", names[1]: "grin_(test_tag)"}
    bundle = renamed_bundle(synth_bundle, tmp_path / "bundle", renames)
    (image,) = copy_images(synth_images, tmp_path / "images", 1)
    exclude = f"{names[2].replace('_', ' ')}, {names[3]}"  # as written in captions or as the model names them
    args = ["--format", "txt", "--replace-underscores", "--escape-brackets", "--rating-first", "--exclude", exclude]
    code, _, err = i2v("tag", str(image), "--model", str(bundle), *ALL, *args)
    assert code == 0, err
    tags = image.with_suffix(".txt").read_text().strip().split(", ")
    assert tags[0] in {"general", "sensitive", "questionable", "explicit"}
    assert "^_^" in tags and "grin \\(test tag\\)" in tags  # the kaomoji keeps its underscore
    assert not any("_" in t for t in tags if t != "^_^")
    opts = CaptionOptions(replace_underscores=True, escape_brackets=True)
    expected = {opts.name(renames.get(n, n)) for n in names[4:]}
    assert expected <= set(tags) and not {opts.name(n) for n in names[2:4]} & set(tags)


def test_caption_names():
    opts = CaptionOptions(replace_underscores=True, escape_brackets=True)
    assert opts.name("long_hair") == "long hair"
    assert all(opts.name(k) == k.replace("(", "\\(").replace(")", "\\)") for k in KAOMOJIS)
    assert opts.name("hatsune_miku_(cosplay)") == "hatsune miku \\(cosplay\\)"
    assert CaptionOptions().name("hatsune_miku_(cosplay)") == "hatsune_miku_(cosplay)"
    assert parse_exclude("long hair, 1girl,, hatsune miku \\(cosplay\\)") == (
        "long_hair",
        "1girl",
        "hatsune_miku_(cosplay)",
    )


@pytest.fixture
def mixed(synth_images, tmp_path) -> Path:
    """Two good images, one PNG named .jpg, one JPEG without a suffix, a corrupt JPEG, an empty PNG, notes.txt."""
    folder = tmp_path / "mixed"
    copy_images(synth_images, folder, 2)
    images = images_of(synth_images)
    png = next(p for p in images if p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
    jpeg = next(p for p in images if p.read_bytes()[:3] == b"\xff\xd8\xff")
    (folder / "really_a_png.jpg").write_bytes(png.read_bytes())
    (folder / "no_suffix").write_bytes(jpeg.read_bytes())
    (folder / "corrupt.jpg").write_bytes(jpeg.read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_bad_files_are_named_counted_and_skipped(mixed, synth_bundle):
    r = subprocess_i2v("-v", "tag", str(mixed), "--model", str(synth_bundle), "--format", "jsonl")
    assert r.returncode == 1
    tagged = {Path(json.loads(line)["path"]).name for line in r.stdout.splitlines()}
    assert len(tagged) == 4 and {"really_a_png.jpg", "no_suffix"} <= tagged
    lines = r.stderr.splitlines()
    assert any(line.startswith(f"{mixed / 'corrupt.jpg'}: ") for line in lines), r.stderr
    assert any(line.startswith(f"{mixed / 'empty.png'}: empty file") for line in lines), r.stderr
    assert any("notes.txt: not an image" in line for line in lines)  # listed with -v only
    summary = lines[-1]
    assert "tagged 4 images" in summary and "2 failed" in summary and "1 non-image file passed over" in summary
    assert "Traceback" not in r.stderr


def test_non_images_are_quiet_without_v_but_a_named_one_fails(i2v, mixed, synth_bundle):
    code, out, err = i2v("tag", str(mixed), "--model", str(synth_bundle), "--format", "jsonl")
    assert code == 1 and len(out.splitlines()) == 4
    assert "notes.txt" not in err
    code, out, err = i2v("tag", str(mixed / "notes.txt"), str(mixed / "no_suffix"), "--model", str(synth_bundle))
    assert code == 1 and "notes.txt: not a decodable image" in err and "tagged 1 image " in err


def test_recursive(i2v, synth_bundle, synth_images, tmp_path):
    copy_images(synth_images, tmp_path, 1)
    copy_images(synth_images, tmp_path / "a" / "b", 2)
    code, out, err = i2v("tag", str(tmp_path), "--model", str(synth_bundle), "--format", "jsonl")
    assert code == 0 and len(out.splitlines()) == 1 and "1 subfolder not entered" in err
    code, out, err = i2v("tag", str(tmp_path), "-r", "--model", str(synth_bundle), "--format", "jsonl")
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert code == 0 and len(paths) == 3 and sum("/a/b/" in p for p in paths) == 2


def test_shards_partition_the_files(i2v, synth_bundle, synth_images):
    parts = []
    for shard in ("0/2", "1/2"):
        args = ["--format", "jsonl", "--shard", shard]
        code, out, err = i2v("tag", str(synth_images), "--model", str(synth_bundle), *args)
        assert code == 0, err
        parts.append({json.loads(line)["path"] for line in out.splitlines()})
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == {str(p) for p in images_of(synth_images)}
    code, _, err = i2v("tag", str(synth_images), "--model", str(synth_bundle), "--shard", "2/2")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --shard 2/2")


def test_shard_keys_do_not_depend_on_where_the_folder_is(tmp_path):
    (tmp_path / "x" / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (tmp_path / "x" / name).write_bytes(b"")
    keys = [it.key for it in discover([str(tmp_path / "x")], recursive=True)]
    assert keys == ["a.png", "b.png", "sub/c.png"]
    assert sum(in_shard(k, (i, 3)) for k in keys for i in range(3)) == 3


def test_onnx_path_never_imports_torch(synth_bundle, synth_images):
    code = (
        "import sys\n"
        "from illust2vec.cli import main\n"
        f"sys.argv = ['i2v', 'tag', {str(synth_images)!r}, '--model', {str(synth_bundle)!r}, '--format', 'jsonl',"
        " '--device', 'cpu']\n"
        "try:\n    main()\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules, 'onnxruntime' in sys.modules, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stderr.strip().splitlines()[-1] == "exit 0 False True", r.stderr
    assert len(r.stdout.splitlines()) == 12


def test_torch_and_onnx_backends_agree(synth_bundle, synth_images, scores):
    r = subprocess_i2v(
        "tag", str(synth_images), "--model", str(synth_bundle), "--format", "json", "--backend", "torch", *ALL
    )
    assert r.returncode == 0, r.stderr
    torch_records = json.loads(r.stdout)
    assert len(torch_records) == 12
    for rec in torch_records:
        onnx = scores[rec["path"]]  # the default backend on this CPU: onnx (see the test above)
        for head in ("rating", "general", "character"):
            assert set(rec[head]) == set(onnx[head])
            diff = np.array([rec[head][t] - onnx[head][t] for t in rec[head]])
            assert np.abs(diff).max() < 1e-4, head


@pytest.mark.parametrize(
    "args, needle",
    [
        (["tag", "IMAGES", "--model", "MISSING"], "no such model directory"),
        (["tag", "MISSING", "--model", "BUNDLE"], "no such file or folder"),
        (["tag", "IMAGES", "--model", "BUNDLE", "--format", "xml"], "--format must be one of"),
        (["tag", "IMAGES", "--model", "BUNDLE", "--append"], "--append merges into caption files"),
        (["tag", "IMAGES", "--model", "BUNDLE", "--threshold", "1.5"], "--threshold must be between 0 and 1"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(args, needle, synth_bundle, synth_images, tmp_path):
    where = {"IMAGES": str(synth_images), "BUNDLE": str(synth_bundle), "MISSING": str(tmp_path / "missing")}
    r = subprocess_i2v(*[where.get(a, a) for a in args])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert r.stdout == ""
