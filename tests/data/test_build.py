"""`i2v build`: labels, splits, samples prepared as inference prepares them, every kind of bad file handled or
reported (never a crash), and a config that checks itself."""

import errno
import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from illust2vec.booru.sites import Post, post_record
from illust2vec.data.build import BuildConfig, build, split_of
from illust2vec.errors import UserError
from illust2vec.formats import shards
from illust2vec.formats.posts import read_posts, write_posts
from illust2vec.formats.shards import ShardWriter, index_shard, iter_samples, read_member
from illust2vec.formats.vocab import Vocab, read_vocab, write_vocab
from illust2vec.infer.preprocess import prepare, read_image


def test_split_is_stable_grouped_by_parent_and_nested():
    assert split_of(123, None, 0.1, 0.1) == split_of(123, None, 0.1, 0.1)
    assert split_of(5, 77, 0.2, 0.2) == split_of(77, None, 0.2, 0.2) == split_of(9, 77, 0.2, 0.2)
    counts = Counter(split_of(i, None, 0.1, 0.05) for i in range(20_000))
    assert abs(counts["test"] / 20_000 - 0.05) < 0.01 and abs(counts["val"] / 20_000 - 0.1) < 0.01
    # Growing the validation fraction only moves training posts into it.
    for i in range(2000):
        small, big = split_of(i, None, 0.05, 0.05), split_of(i, None, 0.2, 0.05)
        assert small == big or (small, big) == ("train", "val")


def inference_input(data: bytes, size: int) -> np.ndarray:
    """What inference feeds the model for these image bytes, as RGB uint8 (the model takes float BGR)."""
    return prepare(read_image(data, size), size)[:, :, ::-1].astype(np.uint8)


def crawled_images(crawl_dir: Path) -> dict[str, bytes]:
    """md5 -> the image bytes the crawl stored."""
    return {
        m.key: read_member(m)
        for path in sorted((crawl_dir / "images").glob("*.tar"))
        for m in index_shard(path)
        if m.ext != "json"
    }


def test_build_of_the_synthetic_crawl(synth_crawl, synth_vocab, synth_build):
    info = json.loads((synth_build / "dataset.json").read_text())
    vocab = read_vocab(synth_build / "selected_tags.csv")
    assert info["vocab_hash"] == vocab.hash == read_vocab(synth_vocab).hash
    assert info["image_size"] == 96 and info["heads"]["general"] == 60
    posts = {r["id"]: r for r in read_posts([synth_crawl]).to_pylist() if r["status"] == "ok"}
    images = crawled_images(synth_crawl)
    seen = {}
    for split in ("train", "val", "test"):
        paths = [synth_build / n for n in info["splits"][split]["shards"]]
        n = 0
        for key, files in iter_samples(paths):
            meta = json.loads(files["json"])
            post = posts[meta["id"]]
            assert key == post["md5"] and meta["split"] == split
            assert split == split_of(post["id"], post["parent_id"], 0.15, 0.1)
            tags = {c: post[f"tags_{c}"] for c in ("general", "character", "copyright", "artist")}
            assert meta["labels"] == vocab.encode(post["rating"], tags)
            image = Image.open(io.BytesIO(files["png"]))
            assert image.size == (96, 96) and image.mode == "RGB"
            # The very pixels inference gives the model for the same picture (PNG keeps them exactly).
            assert np.array_equal(np.asarray(image), inference_input(images[key], 96))
            seen[meta["id"]] = (image, post)
            n += 1
        assert n == info["splits"][split]["samples"] > 0
    assert len(seen) == sum(info["splits"][s]["samples"] for s in ("train", "val", "test"))
    assert len(seen) + sum(info["skipped"].values()) == len(posts)
    # Padding is white and centred: a wide picture has white bands above and below.
    wide = [(img, p) for img, p in seen.values() if p["width"] > 1.4 * p["height"]]
    assert wide
    for image, _ in wide:
        arr = np.asarray(image)
        assert (arr[:3] == 255).all() and (arr[-3:] == 255).all()


def test_rebuild_gives_the_same_shards(synth_crawl, synth_vocab, synth_build, tmp_path):
    build(
        BuildConfig(
            dirs=(synth_crawl,),
            vocab=synth_vocab,
            out=tmp_path,
            size=96,
            shard_size=40,
            val_fraction=0.15,
            test_fraction=0.1,
            workers=1,
            format="png",
        )
    )
    for split in ("train", "val", "test"):
        names = json.loads((tmp_path / "dataset.json").read_text())["splits"][split]["shards"]
        a = [(k, f["json"]) for k, f in iter_samples(tmp_path / n for n in names)]
        b = [(k, f["json"]) for k, f in iter_samples(synth_build / n for n in names)]
        assert a == b


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims another size: what a decompression bomb looks like to a decoder."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _awkward_files() -> dict[str, tuple[str, bytes]]:
    """name -> (ext, bytes): the awkward and the broken files of a real board."""
    halves = Image.new("RGB", (200, 100), (255, 0, 0))
    halves.paste((0, 0, 255), (100, 0, 200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    palette = Image.new("P", (100, 100), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 50, 100))
    gif = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    webp = [Image.new("RGB", (64, 64), c) for c in ((0, 0, 255), (255, 255, 0))]
    noise = np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)
    good = _encode(Image.fromarray(noise), "JPEG", quality=95)  # noisy, so that half of it is pixel data
    return {
        "good": ("jpg", good),
        "cmyk": ("jpg", _encode(Image.new("RGB", (80, 80), (0, 128, 255)).convert("CMYK"), "JPEG", quality=95)),
        "sixteen": ("png", _encode(Image.fromarray(np.full((60, 60), 32896, np.uint16)), "PNG")),
        "palette": ("png", _encode(palette, "PNG", transparency=0)),
        "gif": ("gif", _encode(gif[0], "GIF", save_all=True, append_images=gif[1:], duration=100, loop=0)),
        "webp": ("webp", _encode(webp[0], "WEBP", save_all=True, append_images=webp[1:], duration=100, lossless=True)),
        "exif": ("jpg", _encode(halves, "JPEG", quality=95, exif=exif)),
        "truncated": ("jpg", good[: len(good) // 2]),
        "empty": ("jpg", b""),
        "html": ("jpg", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>"),
        "bomb": ("png", _png_claiming(30_000, 30_000)),
    }


@pytest.fixture()
def awkward(tmp_path) -> tuple[Path, Path, dict[str, int]]:
    crawl_dir = tmp_path / "crawl"
    writer = ShardWriter(crawl_dir, "images/{index:06d}.tar")
    rows, ids = [], {}
    files = _awkward_files()
    for i, (name, (ext, data)) in enumerate([*files.items(), ("missing", ("jpg", b"")), ("untagged", files["good"])]):
        md5 = f"{i:032x}"
        post = Post(
            id=i + 1,
            md5=md5,
            file_url=f"http://x/{md5}.{ext}",
            file_ext=ext,
            width=1,
            height=1,
            rating="g",
            score=0,
            created_at=None,
            tags_general=("1girl",) if name != "untagged" else ("other",),
            tags_character=(),
            tags_copyright=(),
            tags_artist=(),
            tags_meta=(),
            site="danbooru",
            parent_id=None,
        )
        if name != "missing":
            writer.add(md5, {ext: data, "json": b"{}"})
        rows.append(post_record(post, "ok", shard="images/000000.tar"))
        ids[name] = i + 1
    writer.close()
    (crawl_dir / "posts").mkdir()
    write_posts(crawl_dir / "posts" / "000000.parquet", rows)
    vocab_path = tmp_path / "selected_tags.csv"
    write_vocab(
        Vocab(
            (9999999, 9999998, 9999997, 9999996, 1),
            ("general", "sensitive", "questionable", "explicit", "1girl"),
            (9, 9, 9, 9, 0),
            (1, 1, 1, 1, 1),
        ),
        vocab_path,
    )
    return crawl_dir, vocab_path, ids


def test_awkward_files_are_handled_and_broken_ones_counted(awkward, tmp_path):
    crawl_dir, vocab_path, ids = awkward
    out = tmp_path / "ds"
    summary = build(
        BuildConfig(
            dirs=(crawl_dir,),
            vocab=vocab_path,
            out=out,
            size=64,
            val_fraction=0.0,
            test_fraction=0.0,
            workers=2,
            format="png",
        )
    )
    info = summary.as_dict()
    assert info == json.loads(summary.path.read_text()) and summary.path == out / "dataset.json"
    assert summary.info.splits["train"].samples == 7 and summary.info.splits["val"].shards == []
    assert info["skipped"] == {
        "corrupt": 1,
        "empty": 1,
        "missing_image": 1,
        "no_selected_tag": 1,
        "not_image": 1,
        "too_large": 1,
    }
    assert set(info["skipped_examples"]) >= {"corrupt", "empty", "not_image", "too_large"}
    built = {
        json.loads(f["json"])["id"]: np.asarray(Image.open(io.BytesIO(f["png"])))
        for _, f in iter_samples(sorted(out.glob("train-*.tar")))
    }
    names = {v: k for k, v in ids.items()}
    assert {names[i] for i in built} == {"good", "cmyk", "sixteen", "palette", "gif", "webp", "exif"}
    files = _awkward_files()
    for i, pixels in built.items():
        assert np.array_equal(pixels, inference_input(files[names[i]][1], 64)), names[i]

    def near(pixel, rgb, tol=24):
        return all(abs(int(a) - b) <= tol for a, b in zip(pixel, rgb, strict=True))

    assert near(built[ids["cmyk"]][32, 32], (0, 128, 255))
    assert near(built[ids["sixteen"]][32, 32], (128, 128, 128), tol=2)  # not clipped to white
    assert near(built[ids["palette"]][32, 8], (255, 255, 255), tol=0)  # transparent -> white, not black
    assert near(built[ids["palette"]][32, 56], (0, 0, 255), tol=0)
    assert near(built[ids["gif"]][32, 32], (255, 0, 0), tol=0)  # first frame
    assert near(built[ids["webp"]][32, 32], (0, 0, 255), tol=0)
    exif = built[ids["exif"]]  # upright: 100 wide, 200 tall -> red on top, blue below, white at the sides
    assert near(exif[12, 32], (255, 0, 0)) and near(exif[52, 32], (0, 0, 255)) and near(exif[32, 2], (255, 255, 255))


def test_missing_inputs_are_clear_errors(awkward, tmp_path):
    crawl_dir, vocab_path, _ = awkward
    with pytest.raises(UserError, match="no posts"):
        build(BuildConfig(dirs=(tmp_path / "nothing",), vocab=vocab_path, out=tmp_path / "o"))
    with pytest.raises(UserError, match="format"):
        build(BuildConfig(dirs=(crawl_dir,), vocab=vocab_path, out=tmp_path / "o", format="bmp"))
    with pytest.raises(UserError):
        build(BuildConfig(dirs=(crawl_dir,), vocab=tmp_path / "no.csv", out=tmp_path / "o"))


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"format": "bmp"}, "--format must be one of jpg, webp, png, not 'bmp'"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "--val-fraction and --test-fraction"),
        ({"val_fraction": -0.1}, "--val-fraction and --test-fraction"),
        ({"size": 8}, "--size must be at least 16 pixels"),
        ({"quality": 0}, "--quality must be from 1 to 100"),
        ({"workers": 0}, "--workers must be at least 1"),
        ({"shard_size": 0}, "--shard-size must be at least 1"),
        ({"dirs": ()}, "at least one crawl directory"),
    ],
)
def test_config_refuses_mistakes_in_one_line(fields, needle):
    with pytest.raises(UserError) as e:
        BuildConfig(**{"dirs": ("crawl",), "vocab": "v.csv", "out": "ds", **fields})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_takes_strings_and_saves_as_json():
    cfg = BuildConfig(dirs=["a", Path("b")], vocab="v.csv", out="ds", aliases="al.csv")
    assert cfg.dirs == (Path("a"), Path("b")) and cfg.vocab == Path("v.csv") and cfg.aliases == Path("al.csv")
    saved = cfg.as_json()
    assert json.loads(json.dumps(saved)) == saved
    assert saved["dirs"] == ["a", "b"] and saved["aliases"] == "al.csv" and saved["size"] == 256
    assert BuildConfig(**{**saved, "dirs": tuple(saved["dirs"])}) == cfg


def test_full_disk_stops_the_build_cleanly(awkward, tmp_path, monkeypatch):
    crawl_dir, vocab_path, _ = awkward

    def full(self, key, files):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.ShardWriter, "add", full)
    with pytest.raises(UserError, match="full"):
        build(BuildConfig(dirs=(crawl_dir,), vocab=vocab_path, out=tmp_path / "o", workers=1))
    assert not list((tmp_path / "o").glob("*.tmp")) and not (tmp_path / "o" / "dataset.json").exists()


def test_build_command(synth_crawl, synth_vocab, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "illust2vec.cli", "build", str(synth_crawl), "--vocab", str(synth_vocab)]
    r = subprocess.run(
        [*cmd, "--out", str(tmp_path / "ds"), "--size", "64", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "train:" in r.stderr and r.stdout == ""
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["image_size"] == 64 and info["image_format"] == "jpg" and info["splits"]["train"]["samples"] > 0
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "x"), "--format", "bmp"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--format" in bad.stderr


def test_a_crawl_shard_cut_to_half_gives_its_readable_images_and_counts_the_rest(
    synth_crawl, synth_vocab, synth_build, tmp_path, caplog
):
    import shutil

    from illust2vec.formats.shards import image_shards

    crawl_dir = Path(shutil.copytree(synth_crawl, tmp_path / "crawl"))
    shard = image_shards(crawl_dir)[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        info = build(BuildConfig(dirs=(crawl_dir,), vocab=synth_vocab, out=tmp_path / "o", size=64, workers=1)).info
    whole = json.loads((synth_build / "dataset.json").read_text())
    lost = info.skipped.get("truncated_shard", 0)
    built = sum(s.samples for s in info.splits.values())
    assert lost > 0 and 0 < built < sum(s["samples"] for s in whole["splits"].values())
    assert built + lost == sum(s["samples"] for s in whole["splits"].values())  # every post is either built or counted
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(shard) in w and "cut short" in w and "truncated_shard" in w for w in warnings), warnings
