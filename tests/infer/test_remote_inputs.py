"""`i2v tag` and `i2v embed` on object storage (a real S3 API: moto's server): images under an s3:// prefix and tar
shards at URLs score as the same local files do, records name the URL as given; `--out s3://...` for tag's records
and embed's vectors (read back by `read_vectors` from the URL, as `i2v index build` does); a cut remote shard is
counted as a local one is; txt captions refused for remote inputs."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from illust2vec.formats.shards import image_shards, read_member, scan_shard
from illust2vec.formats.vectors import read_vectors
from illust2vec.util import storage

ALL = ["--threshold", "0", "--character-threshold", "0"]  # every general and character tag, with its score
HEADS = ("rating", "general", "character", "copyright")


def records(text: str) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, text.splitlines())}


def assert_same_scores(a: dict, b: dict) -> None:
    for head in HEADS:
        assert set(a[head]) == set(b[head]), head
        for tag, score in a[head].items():
            assert abs(score - b[head][tag]) <= 1e-5, (head, tag, score, b[head][tag])


def upload_folder(folder: Path, prefix: str) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    for n in names:
        storage.write_bytes(f"{prefix}/{n}", (folder / n).read_bytes())
    return names


@pytest.fixture(scope="module")
def shard(synth_crawl, tmp_path_factory) -> Path:
    """The first 10 posts of the crawl's first raw image shard (each `{md5}.{ext}` and `{md5}.json`)."""
    path = tmp_path_factory.mktemp("shard") / "000000.tar"
    with tarfile.open(image_shards(synth_crawl)[0]) as src, tarfile.open(path, "w") as dst:
        for m in [m for m in src if m.isfile()][:20]:
            dst.addfile(m, src.extractfile(m))
    return path


def test_tag_over_an_s3_prefix_equals_the_local_folder_and_out_to_s3(i2v, synth_bundle, synth_images, bucket):
    names = upload_folder(synth_images, f"{bucket}/pics")
    storage.write_bytes(f"{bucket}/pics/sub/deeper.png", (synth_images / names[0]).read_bytes())
    code, local, err = i2v("tag", str(synth_images), "--model", str(synth_bundle), "--format", "jsonl", *ALL)
    assert code == 0, err
    code, remote, err = i2v("tag", f"{bucket}/pics/", "--model", str(synth_bundle), "--format", "jsonl", *ALL)
    assert code == 0, err
    images = [n for n in names if n != "truth.json"]
    assert list(records(remote)) == [f"{bucket}/pics/{n}" for n in images]  # the URL as given, in name order
    assert "1 non-image file passed over" in err and "1 subfolder not entered" in err  # as in a local folder
    for n in images:
        assert_same_scores(records(remote)[f"{bucket}/pics/{n}"], records(local)[str(synth_images / n)])
    code, nothing, err = i2v(
        "tag", f"{bucket}/pics", "-r", "--model", str(synth_bundle), "--format", "jsonl", "--out", f"{bucket}/t.jsonl"
    )
    assert code == 0 and nothing == "", err
    written = records(storage.read_text(f"{bucket}/t.jsonl"))
    assert sorted(written) == sorted([*records(remote), f"{bucket}/pics/sub/deeper.png"])
    assert err.strip().splitlines()[-1].startswith(f"{bucket}/t.jsonl: tagged {len(images) + 1} images")


def test_a_remote_shard_is_read_in_ranges_and_scores_as_the_local_one(i2v, synth_bundle, shard, bucket, monkeypatch):
    url = f"{bucket}/shards/{shard.name}"
    storage.upload(shard, url)
    local = scan_shard(shard)
    remote = scan_shard(url)
    assert remote.problem == "" and [(m.key, m.offset, m.size) for m in remote.members] == [
        (m.key, m.offset, m.size) for m in local.members
    ]
    assert read_member(remote.members[3]) == read_member(local.members[3])
    fetched = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda loc: fetched.append(loc) or real(loc))
    code, out, err = i2v("tag", url, "--model", str(synth_bundle), "--format", "jsonl", *ALL)
    assert code == 0, err
    assert fetched == []  # members are ranged reads of the shard, never the whole object
    code, want, err = i2v("tag", str(shard), "--model", str(synth_bundle), "--format", "jsonl", *ALL)
    assert code == 0, err
    got = records(out)
    assert list(got) == [p.replace(str(shard), url) for p in records(want)]  # SHARD/MEMBER with the shard's URL
    for path, record in records(want).items():
        assert_same_scores(got[path.replace(str(shard), url)], record)


def test_a_cut_remote_shard_is_counted_as_a_local_one(i2v, synth_bundle, shard, bucket):
    data = shard.read_bytes()
    url = f"{bucket}/cut.tar"
    storage.write_bytes(url, data[: len(data) // 2])
    code, out, err = i2v("tag", url, "--model", str(synth_bundle), "--format", "jsonl")
    assert code == 1 and "Traceback" not in err
    assert f"{url}: cut short at {len(data) // 2} bytes" in err and "1 corrupt" in err.strip().splitlines()[-1]
    assert len(records(out)) >= 3 and all(p.startswith(f"{url}/") for p in records(out))


def test_txt_is_refused_for_remote_inputs_and_a_missing_prefix_is_one_line(i2v, synth_bundle, synth_images, bucket):
    upload_folder(synth_images, f"{bucket}/pics")
    code, out, err = i2v("tag", f"{bucket}/pics", "--model", str(synth_bundle), "--format", "txt")
    assert code == 2 and out == ""
    assert err.strip().startswith(f"error: {bucket}/pics/") and "a remote file" in err
    assert "beside local image files only" in err and len(err.strip().splitlines()) == 1
    code, out, err = i2v("tag", f"{bucket}/nothing", "--model", str(synth_bundle), "--format", "jsonl")
    assert (code, out, err.strip()) == (2, "", f"error: {bucket}/nothing: no such file or folder")


def test_embed_from_s3_to_s3_equals_local_and_resumes(i2v, synth_bundle, synth_images, shard, bucket, tmp_path):
    names = [n for n in upload_folder(synth_images, f"{bucket}/pics") if n != "truth.json"]
    storage.upload(shard, f"{bucket}/pics/{shard.name}")
    local_out = tmp_path / "local.parquet"
    code, _, err = i2v("embed", str(synth_images), str(shard), "--model", str(synth_bundle), "--out", str(local_out))
    assert code == 0, err
    out = f"{bucket}/vectors/all.parquet"
    code, _, err = i2v("embed", f"{bucket}/pics", "--model", str(synth_bundle), "--out", out)
    assert code == 0, err
    remote, local = read_vectors([out]), read_vectors([local_out])
    assert (
        sorted(remote.ids) == sorted(local.ids) and len(remote.ids) == len(names) + len(scan_shard(shard).members) // 2
    )
    order = [local.ids.index(i) for i in remote.ids]
    np.testing.assert_allclose(remote.vectors, local.vectors[order], atol=1e-5)
    assert remote.paths[remote.ids.index(names[0])] == f"{bucket}/pics/{names[0]}"
    assert storage.listing(f"{bucket}/vectors/all.parquet.parts") == []  # merged, parts removed
    assert read_vectors([f"{bucket}/vectors"]).ids == remote.ids  # a prefix read as a folder of vectors files
    code, _, err = i2v("embed", f"{bucket}/pics", "--model", str(synth_bundle), "--out", out)
    assert code == 0 and f"{len(remote.ids)} done before (resumed)" in err and "embedded 0 images" in err


def test_member_names_of_a_remote_shard_keep_their_folders(bucket, tmp_path):
    """A member inside a folder of the tar (img2dataset writes flat, others do not) is SHARD/FOLDER/NAME."""
    import io

    from illust2vec.infer.engine import discover

    path = tmp_path / "nested.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a/1.jpg", "a/1.json", "b.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    storage.upload(path, f"{bucket}/nested.tar")
    items = discover([f"{bucket}/nested.tar"], recursive=False)
    assert [str(it.path) for it in items] == [f"{bucket}/nested.tar/{n}" for n in ("a/1.jpg", "a/1.json", "b.png")]
    assert [it.key for it in items] == ["nested.tar/a/1.jpg", "nested.tar/a/1.json", "nested.tar/b.png"]


def test_an_http_file_is_one_item_named_by_its_url(i2v, synth_bundle, synth_images):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(synth_images))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        name = sorted(p.name for p in synth_images.iterdir() if p.suffix == ".png")[0]
        url = f"http://127.0.0.1:{server.server_port}/{name}"
        code, out, err = i2v("tag", url, "--model", str(synth_bundle), "--format", "jsonl", *ALL)
        assert code == 0, err
        code, want, err = i2v("tag", str(synth_images / name), "--model", str(synth_bundle), "--format", "jsonl", *ALL)
        assert code == 0, err
        assert list(records(out)) == [url]
        assert_same_scores(records(out)[url], records(want)[str(synth_images / name)])
        code, out, err = i2v("tag", url, "--model", str(synth_bundle), "--format", "jsonl", "--out", f"{url}.jsonl")
        assert code == 2 and err.strip() == f"error: --out {url}.jsonl: http:// URLs can be read but not written"
    finally:
        server.shutdown()


def test_a_missing_bucket_is_named_as_such(i2v, synth_bundle, s3_server):
    code, out, err = i2v("tag", "s3://no-such-bucket-h3/pics", "--model", str(synth_bundle), "--format", "jsonl")
    assert (code, out) == (2, "") and err.strip() == "error: s3://no-such-bucket-h3/pics: cannot read: no such bucket"


def test_the_python_api_reads_an_image_at_a_url(synth_bundle, synth_images, bucket):
    from illust2vec.infer.tagger import Tagger

    image = sorted(p for p in synth_images.iterdir() if p.suffix == ".jpg")[0]
    storage.write_bytes(f"{bucket}/one.jpg", image.read_bytes())
    tagger = Tagger.load(synth_bundle)
    np.testing.assert_allclose(tagger.predict([f"{bucket}/one.jpg"]), tagger.predict([image]), atol=1e-6)
