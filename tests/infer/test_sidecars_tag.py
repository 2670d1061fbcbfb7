"""`i2v tag` into collections, end to end on the synthetic board's bundle: XMP sidecars and embedded XMP/IPTC read
back by exiftool equal the tags of `--format json`; Hydrus sidecars; caption rules; incremental reruns after adding,
changing and deleting files; read-only files and GIFs reported while the rest is tagged; honest device selection."""

import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from illust2vec.formats.catalogue import NAME

from .test_sidecars import exiftool, read_tags  # noqa: F401 (exiftool is a fixture)

ONNX = ["--backend", "onnx"]


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".webp", ".gif", ".tif"))


def copy(src: Path, dst: Path, names=None) -> list[Path]:
    dst.mkdir(exist_ok=True)
    return [Path(shutil.copy(p, dst / p.name)) for p in images_in(src) if names is None or p.name in names]


def json_tags(i2v, bundle: Path, folder: Path, *args: str) -> dict[str, dict]:
    code, out, err = i2v("tag", str(folder), "--model", str(bundle), "--format", "json", *ONNX, *args)
    assert code == 0, err
    return {Path(r["path"]).name: r for r in json.loads(out)}


def flat(record: dict) -> list[str]:
    """The keywords a record's tags make: fixed tags, the top rating, characters, copyrights, general."""
    tags = list(record.get("added", [])) + list(record["rating"])[:1]
    for head in ("character", "copyright", "general"):
        tags += list(record[head])
    return list(dict.fromkeys(tags))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_xmp_sidecars_hold_exactly_the_json_tags(i2v, exiftool, synth_bundle, synth_images, tmp_path):  # noqa: F811
    folder = tmp_path / "c"
    copy(synth_images, folder)
    records = json_tags(i2v, synth_bundle, folder)
    code, out, err = i2v("tag", str(folder), "--model", str(synth_bundle), "--format", "xmp", *ONNX)
    assert code == 0, err
    assert out == "" and "tagged 12 images" in err and "on cpu (onnxruntime CPUExecutionProvider)" in err
    for name, record in records.items():
        got = read_tags(exiftool, folder / f"{name}.xmp")
        assert got["Subject"] == flat(record), name
        heads = ["rating"] + [h for h in ("character", "copyright", "general") for _ in record[h]]
        assert got["HierarchicalSubject"] == [f"illust2vec|{h}|{t}" for h, t in zip(heads, flat(record), strict=True)]
        assert got["TagsList"] == [f"illust2vec/{h}/{t}" for h, t in zip(heads, flat(record), strict=True)]
    assert (folder / NAME).is_file()
    # Lightroom's names: IMAGE.xmp; two images of one stem would share one, so the second is reported
    code, out, err = i2v("tag", str(folder), "--model", str(synth_bundle), "--format", "xmp", "--xmp-name", "stem")
    assert code == 0, err
    assert {p.stem for p in folder.glob("*.xmp") if p.suffixes == [".xmp"]} == {Path(n).stem for n in records}


def test_embedded_tags_equal_json_pixels_untouched_gif_reported(i2v, exiftool, synth_bundle, synth_images, tmp_path):  # noqa: F811
    folder = tmp_path / "c"
    files = copy(synth_images, folder)
    png = next(p for p in files if p.suffix == ".png")
    for fmt, ext in (("GIF", ".gif"), ("TIFF", ".tif")):  # the board has no GIF or TIFF among these
        Image.open(png).save(folder / f"{png.stem}-{fmt}{ext}", fmt)
    files = images_in(folder)
    records = json_tags(i2v, synth_bundle, folder)
    before = {p.name: pixels(p) for p in files}
    gifs = [p.name for p in files if p.suffix == ".gif"]
    assert {p.suffix for p in files} == {".jpg", ".png", ".webp", ".gif", ".tif"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    args = ["tag", str(folder), "--model", str(synth_bundle), "--format", "xmp", "--embed", "--keep-mtime", *ONNX]
    code, out, err = i2v(*args)
    assert code == 1  # the GIFs could not be tagged
    assert f"{len(files) - len(gifs)} images" in err and f"{len(gifs)} failed ({len(gifs)} unsupported)" in err
    assert all(f"{g}: a GIF file cannot carry XMP" in err for g in gifs)
    for p in files:
        assert np.array_equal(pixels(p), before[p.name]), p.name
        assert p.stat().st_mtime_ns == mtimes[p.name]
        if p.suffix == ".gif":
            continue
        got = read_tags(exiftool, p)
        assert got["Subject"] == flat(records[p.name]) and len(got["HierarchicalSubject"]) == len(got["Subject"])
        if p.suffix == ".jpg":
            assert got["Keywords"] == flat(records[p.name])
    assert not list(folder.glob(".*.tmp"))
    # the catalogue knows each file as it is after the tags went in: a rerun tags none (the GIFs fail again)
    code, out, err = i2v(*args)
    assert "tagged 0 images" in err and f"{len(files) - len(gifs)} unchanged" in err


def test_incremental_reruns_after_adding_changing_deleting(i2v, synth_bundle, synth_images, tmp_path):
    folder = tmp_path / "c"
    names = [p.name for p in images_in(synth_images)]
    copy(synth_images, folder, names[:8])
    run = ["tag", str(folder), "--model", str(synth_bundle), "--format", "hydrus", *ONNX]
    code, _, err = i2v(*run)
    assert code == 0 and "tagged 8 images" in err and "unchanged" not in err, err
    sidecar = (folder / f"{names[0]}.txt").read_text().splitlines()
    assert any(t.startswith("rating:") for t in sidecar) and all("_" not in t for t in sidecar)
    assert any(t.startswith(("character:", "series:")) for p in folder.glob("*.txt") for t in p.read_text().split("\n"))
    code, _, err = i2v(*run)
    assert code == 0 and "tagged 0 images" in err and "8 unchanged" in err, err
    # 4 new files, one changed (another picture under its name), one deleted
    copy(synth_images, folder, names[8:])
    changed, deleted = folder / names[1], folder / names[2]
    Image.open(synth_images / names[9]).convert("RGB").save(changed, Image.open(changed).format)
    deleted.unlink()
    code, _, err = i2v(*run)
    assert code == 0 and "tagged 5 images" in err and "6 unchanged" in err, err
    db = sqlite3.connect(folder / NAME)
    keys = {k for (k,) in db.execute("SELECT key FROM entries WHERE destination = 'hydrus'")}
    assert keys == set(names) - {names[2]}
    # another destination starts from nothing; --overwrite tags every file again
    code, _, err = i2v("tag", str(folder), "--model", str(synth_bundle), "--format", "txt", *ONNX)
    assert code == 0 and "tagged 11 images" in err, err
    code, _, err = i2v(*run, "--overwrite")
    assert code == 0 and "tagged 11 images" in err and "unchanged" not in err, err
    # other settings alone do not tag again (content and model weights decide); --overwrite does
    code, _, err = i2v(*run, "--threshold", "0.5")
    assert code == 0 and "tagged 0 images" in err and "11 unchanged" in err, err
    # another model (other weights) tags every file again
    other = tmp_path / "other-bundle"
    shutil.copytree(synth_bundle, other)
    with open(other / "model.safetensors", "ab") as f:
        f.write(b" ")
    code, _, err = i2v("tag", str(folder), "--model", str(other), "--format", "hydrus", *ONNX)
    assert code == 0 and "tagged 11 images" in err, err


def test_hydrus_sidecar_of_another_program_is_merged(i2v, synth_bundle, synth_images, tmp_path):
    folder = tmp_path / "c"
    first = copy(synth_images, folder)[0]
    theirs = folder / f"{first.name}.txt"
    theirs.write_text("creator:someone\nmy own tag\n", encoding="utf-8")
    run = ["tag", str(first), "--model", str(synth_bundle), "--format", "hydrus", *ONNX]
    assert i2v(*run)[0] == 0
    lines = theirs.read_text().splitlines()
    assert lines[:2] == ["creator:someone", "my own tag"] and len(lines) > 2
    # retagged with other settings: ours replaced, theirs kept
    assert i2v(*run, "--max-tags", "1", "--overwrite")[0] == 0
    lines = theirs.read_text().splitlines()
    assert lines[:2] == ["creator:someone", "my own tag"] and len(lines) == 4  # + the rating + one tag


def test_caption_rules_in_every_format(i2v, synth_bundle, synth_images, tmp_path):
    folder = tmp_path / "c"
    copy(synth_images, folder)
    base = json_tags(i2v, synth_bundle, folder)
    top = {n: list(r["general"]) for n, r in base.items()}
    name = max(top, key=lambda n: len(top[n]))
    a, b = top[name][0], top[name][1]
    rules = ["--add", "sks style, trigger", "--max-tags", "3", "--replace", f"{a}=renamed", "--exclude", f"*{b[1:]}"]
    ruled = json_tags(i2v, synth_bundle, folder, *rules)[name]
    assert ruled["added"] == ["sks style", "trigger"] and list(ruled)[:2] == ["path", "added"]
    tags = [*ruled["character"], *ruled["copyright"], *ruled["general"]]
    assert len(tags) == 3 and "renamed" in ruled["general"] and a not in tags and b not in tags
    # txt: the fixed tags first; --append keeps a caption's own tags and adds ours once
    caption = folder / (Path(name).stem + ".txt")
    caption.write_text("my style, renamed\n")
    code, _, err = i2v("tag", str(folder), "--model", str(synth_bundle), "--format", "txt", *ONNX, *rules)
    assert code == 0 and "1 skipped: caption exists" in err, err  # without --append a caption of yours stays
    assert caption.read_text() == "my style, renamed\n"
    code, _, err = i2v("tag", str(folder / name), "--model", str(synth_bundle), "--format", "txt", *ONNX, *rules,
                       "--append")  # fmt: skip
    assert code == 0, err
    merged = caption.read_text().strip().split(", ")
    assert merged[:4] == ["my style", "renamed", "sks style", "trigger"] and len(merged) == 2 + 2 + 2
    other = next(p for p in folder.glob("*.txt") if p != caption)
    assert other.read_text().startswith("sks style, trigger, ")
    code, _, err = i2v("tag", str(folder), "--model", str(synth_bundle), "--format", "json", "--append")
    assert code == 2 and "--append merges into caption files" in err


def test_read_only_file_is_reported_and_the_rest_tagged(i2v, synth_bundle, synth_images, tmp_path):
    folder = tmp_path / "c"
    files = [p for p in copy(synth_images, folder) if p.suffix != ".gif"]
    locked = files[0]
    os.chmod(locked, 0o444)
    data = locked.read_bytes()
    code, _, err = i2v("tag", *map(str, files), "--model", str(synth_bundle), "--format", "xmp", "--embed", *ONNX)
    assert code == 1 and f"{locked}: {locked.name} is read-only; not changed" in err
    assert f"tagged {len(files) - 1} images" in err and "1 failed (1 unwritable)" in err
    assert locked.read_bytes() == data


def test_cuda_with_onnx_and_no_cuda_provider_is_one_clear_error(i2v, synth_bundle, synth_images, monkeypatch):
    import onnxruntime as ort

    args = ["tag", str(synth_images), "--model", str(synth_bundle), "--backend", "onnx", "--device", "cuda"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        code, out, err = i2v(*args)
        assert code == 2 and out == "" and "onnxruntime-gpu" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    # a CUDA provider listed but not loading (CUDA or cuDNN libraries missing): onnxruntime would run on the CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda p, o, providers: real(p, o, providers=["CPUExecutionProvider"]))
    code, out, err = i2v(*args)
    assert code == 2 and "CUDA execution provider did not load" in err and "onnxruntime-gpu[cuda,cudnn]" in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--format", "json", "--embed"], "--embed and --xmp-name are for --format xmp"),
        (["--format", "xmp", "--keep-mtime"], "--keep-mtime is for --embed"),
        (["--format", "xmp", "--xmp-name", "base"], "--xmp-name must be one of ext, stem"),
        (["--format", "txt", "--replace", "nude"], "--replace: expected old=new"),
    ],
)
def test_collection_mistakes_are_one_line(i2v, synth_bundle, synth_images, args, needle):
    code, out, err = i2v("tag", str(synth_images), "--model", str(synth_bundle), *args)
    assert code == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_out_file_rerun_appends_what_is_missing(i2v, synth_bundle, synth_images, tmp_path, fmt):
    folder, out = tmp_path / "c", tmp_path / f"tags.{fmt}"
    names = [p.name for p in images_in(synth_images) if not p.name.endswith(".gif")]
    copy(synth_images, folder, names[:5])
    run = ["tag", str(folder), "--model", str(synth_bundle), "--format", fmt, "--out", str(out), *ONNX]

    def rows() -> dict[str, str]:
        lines = out.read_text().splitlines()[(1 if fmt == "csv" else 0) :]
        return {Path(line.split(",")[0] if fmt == "csv" else json.loads(line)["path"]).name: line for line in lines}

    code, _, err = i2v(*run)
    assert code == 0 and "tagged 5 images" in err, err
    first = rows()
    assert set(first) == set(names[:5])
    # stdout is never incremental
    code, stdout, err = i2v("tag", str(folder), "--model", str(synth_bundle), "--format", fmt, *ONNX)
    assert code == 0 and "tagged 5 images" in err
    copy(synth_images, folder, names[5:8])  # three new files
    code, _, err = i2v(*run)
    assert code == 0 and "tagged 3 images" in err and "5 unchanged" in err, err
    second = rows()
    assert set(second) == set(names[:8])
    assert all(second[n] == first[n] for n in names[:5])  # carried over as they were
    # a record removed from the file by hand is tagged again, though its image is unchanged
    kept = [line for line in out.read_text().splitlines() if names[0] not in line]
    out.write_text("\n".join(kept) + "\n")
    code, _, err = i2v(*run)
    assert code == 0 and "tagged 1 image " in err and "7 unchanged" in err, err
    third = rows()
    assert set(third) == set(second) and all(third[n] == second[n] for n in names[1:8])
