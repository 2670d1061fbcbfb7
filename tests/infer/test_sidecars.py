"""XMP sidecars, embedded XMP/IPTC and Hydrus sidecars on their own, read back by exiftool (a reader that is not
ours): the three keyword fields, merging with a user's sidecar, pixels untouched by embedding, atomic replacement,
mtime kept, formats without metadata and read-only files reported.

exiftool is Debian's `libimage-exiftool-perl`, installed with apt-get when missing (as the browser test installs
chromium); when it cannot be, the tests fail and say why, never skip.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aptget import apt_install
from illust2vec.infer import sidecars
from illust2vec.infer.sidecars import SidecarError, embed, hydrus_tags, write_lines, write_sidecar, xmp_path

RECORD = {
    "path": "x",
    "added": ["sks style"],
    "rating": {"sensitive": 0.7, "general": 0.3},
    "general": {"long_hair": 0.9, "smile": 0.8, "^_^": 0.7},
    "character": {"hatsune_miku": 0.95},
    "copyright": {"vocaloid": 0.9},
}
FLAT = ["sks style", "sensitive", "hatsune_miku", "vocaloid", "long_hair", "smile", "^_^"]
HEADS = ["added", "rating", "character", "copyright", "general", "general", "general"]


def find_exiftool() -> str | None:
    return shutil.which("exiftool")


def install_exiftool() -> str:
    """Debian's exiftool (package libimage-exiftool-perl), installed with apt-get when missing."""
    return apt_install("libimage-exiftool-perl", find_exiftool)


@pytest.fixture(scope="session")
def exiftool() -> str:
    return install_exiftool()


def read_tags(exiftool: str, path: Path) -> dict[str, list[str]]:
    """exiftool's reading of the keyword fields, each as a list (exiftool gives one value as a string)."""
    fields = ["-XMP-dc:Subject", "-XMP-lr:HierarchicalSubject", "-XMP-digiKam:TagsList", "-IPTC:Keywords"]
    r = subprocess.run([exiftool, "-j", "-G1", "-charset", "iptc=UTF8", *fields, str(path)], capture_output=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)[0]
    out = {}
    for key, value in data.items():
        if key != "SourceFile":
            out[key.split(":")[1]] = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return out


def expected(flat=FLAT, heads=HEADS) -> dict[str, list[str]]:
    return {
        "Subject": flat,
        "HierarchicalSubject": [f"illust2vec|{h}|{t}" for h, t in zip(heads, flat, strict=True)],
        "TagsList": [f"illust2vec/{h}/{t}" for h, t in zip(heads, flat, strict=True)],
    }


def picture(path: Path, fmt: str) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path, fmt)
    return path


def test_sidecar_fields_read_back_by_exiftool(exiftool, tmp_path):
    image = picture(tmp_path / "a.png", "PNG")
    written = write_sidecar(image, RECORD)
    assert written == tmp_path / "a.png.xmp" and xmp_path(image, "stem") == tmp_path / "a.xmp"
    assert read_tags(exiftool, written) == expected()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.png.xmp"]  # no temporary left
    # the schema's array types: Bag for dc:subject and lr:hierarchicalSubject, Seq for digiKam:TagsList
    text = written.read_text(encoding="utf-8")
    assert text.count("<rdf:Bag>") == 2 and text.count("<rdf:Seq>") == 1
    assert write_sidecar(image, RECORD, "stem") == tmp_path / "a.xmp"


def test_merging_keeps_the_users_keywords_and_replaces_ours(exiftool, tmp_path):
    image = picture(tmp_path / "a.jpg", "JPEG")
    sidecar = tmp_path / "a.jpg.xmp"
    user = ["-XMP-dc:Subject=holiday", "-XMP-dc:Subject=smile", "-XMP-lr:HierarchicalSubject=Places|Paris, France"]
    user += ["-XMP-dc:Title=My picture", "-XMP-xmp:Rating=4"]
    r = subprocess.run([exiftool, "-o", str(sidecar), *user, str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    write_sidecar(image, RECORD)
    got = read_tags(exiftool, sidecar)
    # "smile" was the user's before ours: it stays theirs (we add ours once)
    assert got["Subject"] == ["holiday", "smile", *[t for t in FLAT if t != "smile"]]
    assert got["HierarchicalSubject"] == ["Places|Paris, France", *expected()["HierarchicalSubject"]]
    # a second tagging with other tags: ours replaced, the user's and other fields kept
    again = {"path": "x", "rating": {"general": 1.0}, "general": {"red_eyes": 0.9}}
    write_sidecar(image, again)
    got = read_tags(exiftool, sidecar)
    assert got["Subject"] == ["holiday", "general", "red_eyes"]  # "smile" was named by ours, so it went with ours
    assert got["HierarchicalSubject"] == [
        "Places|Paris, France",
        "illust2vec|rating|general",
        "illust2vec|general|red_eyes",
    ]
    assert got["TagsList"] == ["illust2vec/rating/general", "illust2vec/general/red_eyes"]
    r = subprocess.run([exiftool, "-j", "-Title", "-Rating", str(sidecar)], capture_output=True, text=True)
    assert json.loads(r.stdout)[0] | {"SourceFile": ""} == {"SourceFile": "", "Title": "My picture", "Rating": 4}


def test_a_broken_or_read_only_sidecar_is_reported_not_changed(tmp_path):
    image = picture(tmp_path / "a.png", "PNG")
    sidecar = tmp_path / "a.png.xmp"
    sidecar.write_text("not xmp at all")
    with pytest.raises(SidecarError, match="not readable XMP"):
        write_sidecar(image, RECORD)
    assert sidecar.read_text() == "not xmp at all"
    write_sidecar(image, RECORD, "stem")
    os.chmod(tmp_path / "a.xmp", 0o444)
    before = (tmp_path / "a.xmp").read_bytes()
    with pytest.raises(SidecarError, match="read-only"):
        write_sidecar(image, {"path": "x", "general": {"x": 1.0}}, "stem")
    assert (tmp_path / "a.xmp").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.png.xmp", "a.xmp"]


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")])
def test_embedded_xmp_and_iptc_pixels_untouched(exiftool, tmp_path, fmt, ext):
    image = picture(tmp_path / f"a.{ext}", fmt)
    with Image.open(image) as im:
        pixels = np.asarray(im.convert("RGB")).copy()
    old = os.stat(image)
    os.utime(image, ns=(old.st_atime_ns, old.st_mtime_ns - 10**9))
    mtime = os.stat(image).st_mtime_ns
    embed(image, RECORD, keep_mtime=True)
    got = read_tags(exiftool, image)
    want = expected()
    if fmt == "JPEG":
        want["Keywords"] = FLAT
    assert got == want
    with Image.open(image) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), pixels)
    assert os.stat(image).st_mtime_ns == mtime
    assert os.stat(image).st_ino != old.st_ino  # replaced by a new file (atomic rename), not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [image.name]
    embed(image, {"path": "x", "general": {"smile": 0.5}})  # again: ours replaced; mtime now the write's
    assert read_tags(exiftool, image)["Subject"] == ["smile"]
    assert os.stat(image).st_mtime_ns > mtime


def test_embedding_keeps_the_users_iptc_keywords(exiftool, tmp_path):
    image = picture(tmp_path / "a.jpg", "JPEG")
    r = subprocess.run([exiftool, "-overwrite_original", "-Keywords=holiday", "-Subject=holiday", str(image)])
    assert r.returncode == 0
    embed(image, RECORD)
    assert read_tags(exiftool, image)["Keywords"] == ["holiday", *FLAT]


def test_gif_and_read_only_files_are_reported_untouched(tmp_path):
    gif = picture(tmp_path / "a.gif", "GIF")
    with pytest.raises(SidecarError, match="GIF file cannot carry XMP") as e:
        embed(gif, RECORD)
    assert e.value.reason == "unsupported"
    locked = picture(tmp_path / "b.png", "PNG")
    os.chmod(locked, 0o444)
    before = locked.read_bytes()
    with pytest.raises(SidecarError, match="read-only") as e:
        embed(locked, RECORD)
    assert e.value.reason == "unwritable" and locked.read_bytes() == before


def test_hydrus_namespaces_and_spaces():
    record = {**RECORD, "artist": {"some_artist": 0.8}, "meta": {"highres": 0.9}}
    assert hydrus_tags(record) == [
        "sks style", "rating:sensitive", "character:hatsune miku", "series:vocaloid", "creator:some artist",
        "long hair", "smile", "^_^", "meta:highres",
    ]  # fmt: skip


def test_lines_merge_with_what_exists(tmp_path):
    path = tmp_path / "a.png.txt"
    path.write_text("my tag\ncharacter:hatsune miku\n", encoding="utf-8")
    added = write_lines(path, ["character:hatsune miku", "long hair"], (), "\n")
    assert path.read_text() == "my tag\ncharacter:hatsune miku\nlong hair\n" and added == ("long hair",)
    added = write_lines(path, ["smile"], added, "\n")  # ours from before replaced, theirs kept
    assert path.read_text() == "my tag\ncharacter:hatsune miku\nsmile\n" and added == ("smile",)
    caption = tmp_path / "a.txt"
    caption.write_text("trigger, long hair\n")
    write_lines(caption, ["long_hair", "smile"], (), ", ")
    assert caption.read_text() == "trigger, long hair, smile\n"


def test_missing_pyexiv2_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyexiv2(name, *a, **kw):
        if name == "pyexiv2":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyexiv2)
    with pytest.raises(sidecars.UserError, match=r"illust2vec\[collections\]"):
        sidecars.XmpWriter()
