"""The HTTP API of `i2v serve` through FastAPI's test client, on the fixture bundle and held-out images."""

import asyncio
import dataclasses
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from illust2vec.errors import UserError
from illust2vec.infer.tagger import Tagger
from illust2vec.infer.thresholds import MIN_CHARACTER_MCUT, Selection, mcut_threshold
from illust2vec.search import VectorIndex
from illust2vec.serve import Batcher, ServeConfig, create_app
from illust2vec.serve.state import open_index


@pytest.fixture(scope="module")
def tagger(synth_bundle) -> Tagger:
    return Tagger.load(synth_bundle)


@pytest.fixture(scope="module")
def images(synth_images) -> list[Path]:
    return sorted(p for p in synth_images.iterdir() if p.suffix != ".json")


@pytest.fixture
def client(synth_bundle, tagger):
    with TestClient(create_app(ServeConfig(model=str(synth_bundle)), tagger=tagger)) as c:
        yield c


@pytest.fixture(scope="module")
def index(tagger, images) -> VectorIndex:
    feats = tagger.extract_feature(images)
    # Ids as `i2v embed --ids path` writes them: relative paths, slashes included.
    return VectorIndex.build(feats, [f"set/{p.name}" for p in images], [str(p) for p in images])


@pytest.fixture
def indexed(synth_bundle, tagger, index):
    with TestClient(create_app(ServeConfig(model=str(synth_bundle)), tagger=tagger, index=index)) as c:
        yield c


def post_image(client, path: Path, url: str = "/api/tag", **kw) -> httpx.Response:
    return client.post(url, files={"file": (path.name, path.read_bytes())}, **kw)


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge picture: a few dozen bytes that would decode to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ---- tagging


def test_tag_answers_the_scores_of_tagger_predict(client, tagger, images):
    for path in images[:4]:  # JPEG, PNG, WebP and GIF are among them
        r = post_image(client, path)
        assert r.status_code == 200, r.text
        got = r.json()
        probs = tagger.predict([path])[0]
        expected = tagger.scores(probs)
        assert set(got["scores"]) == set(expected)
        for head, tags in expected.items():
            assert list(got["scores"][head]) == list(tags)  # every tag, highest first
            for tag, score in tags.items():
                assert got["scores"][head][tag] == pytest.approx(score, abs=1e-5)
        selected = tagger.select(probs, Selection())
        for head in ("rating", "general", "character", "copyright"):
            assert list(got[head]) == list(selected.get(head, {})), head
            for tag, score in selected.get(head, {}).items():
                assert got[head][tag] == pytest.approx(score, abs=1e-5)
        assert got["path"] == path.name
        with Image.open(path) as im:
            assert (got["width"], got["height"]) == im.size
        assert got["model_thresholds"]["heads"]["general"] == pytest.approx(tagger.thresholds.heads["general"])


def test_thresholds_from_query_and_form(client, tagger, images):
    path = images[0]
    probs = tagger.predict([path])[0]
    general = tagger.scores(probs)["general"]
    everything = post_image(client, path, params={"general": 0.0}).json()
    assert list(everything["general"]) == list(general) and everything["thresholds"]["general"] == 0.0
    middle = float(np.median(list(general.values())))
    r = client.post("/api/tag", files={"file": (path.name, path.read_bytes())}, data={"general": str(middle)}).json()
    assert r["general"] == {t: pytest.approx(s, abs=1e-5) for t, s in general.items() if s >= middle}
    assert 0 < len(r["general"]) < len(general)
    none = post_image(client, path, params={"general": 1.0, "character": 1.0}).json()
    assert none["general"] == {} and none["character"] == {}
    mcut = post_image(client, path, params={"mcut": True}).json()
    ix = list(tagger.labels.heads["general"])
    assert mcut["thresholds"]["general"] == pytest.approx(mcut_threshold(probs[ix]), abs=1e-6)
    assert all(s >= mcut["thresholds"]["general"] for s in mcut["general"].values())
    # MCut's thresholds come with every answer (the page's MCut box), the character one floored as the WD Space does.
    for answer in (everything, mcut):
        assert set(answer["mcut_thresholds"]) == {"general", "character"}
        assert answer["mcut_thresholds"]["general"] == mcut["thresholds"]["general"]
        cx = list(tagger.labels.heads["character"])
        floored = max(MIN_CHARACTER_MCUT, mcut_threshold(probs[cx]))
        assert answer["mcut_thresholds"]["character"] == pytest.approx(floored, abs=1e-6)
    bad = post_image(client, path, params={"general": 1.5})
    assert bad.status_code == 422 and "general" in bad.json()["error"]


# ---- refusals: all JSON, none with a traceback


def refused(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "Traceback" not in r.text and 'File "' not in r.text
    return r.json()["error"]


def test_a_text_file_is_415(client):
    r = client.post("/api/tag", files={"file": ("notes.txt", b"not an image at all\n", "text/plain")})
    assert "not an image" in refused(r, 415)
    assert "not an image" in refused(client.post("/api/tag", files={"file": ("empty.png", b"")}), 415)


def test_a_missing_file_is_422(client):
    assert "file" in refused(client.post("/api/tag", data={"general": "0.5"}), 422)


def test_a_decompression_bomb_is_413(client):
    r = client.post("/api/tag", files={"file": ("bomb.png", png_bomb(40_000, 40_000))})
    assert "pixel limit" in refused(r, 413)


def test_an_oversized_upload_is_413(synth_bundle, tagger, images):
    app = create_app(ServeConfig(model=str(synth_bundle), max_upload_mb=0.05), tagger=tagger)
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")  # incompressible noise: about 480 KB
    with TestClient(app) as c:
        assert "too large" in refused(c.post("/api/tag", files={"file": ("big.png", buf.getvalue())}), 413)
        assert app.state.serve.batcher.stats.images == 0
        buf = io.BytesIO()
        Image.fromarray(big[:64, :64]).save(buf, "PNG")  # about 12 KB: under the limit
        assert c.post("/api/tag", files={"file": ("small.png", buf.getvalue())}).status_code == 200


def test_the_upload_limit_stops_reading_a_chunked_body_early(synth_bundle, tagger):
    """Without a Content-Length, the body is counted as it arrives and refused once past the limit, unread."""
    app = create_app(ServeConfig(model=str(synth_bundle), max_upload_mb=0.05), tagger=tagger)
    boundary = "xyz"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
    chunks = [head] + [b"\0" * 16384] * 64  # 1 MB in 64 pieces
    consumed = 0
    sent = []

    async def receive():
        nonlocal consumed
        consumed += 1
        return {"type": "http.request", "body": chunks[consumed - 1], "more_body": consumed < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/api/tag",
        "raw_path": b"/api/tag",
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and "too large" in json.loads(body)["error"]
    assert consumed < 10  # 0.05 MB + the form's allowance is about 7 chunks of 16 KB


def test_an_internal_error_is_a_json_500_without_traceback(synth_bundle, tagger, images, caplog):
    broken = dataclasses.replace(tagger, backend=_Broken())
    app = create_app(ServeConfig(model=str(synth_bundle)), tagger=broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        error = refused(post_image(c, images[0]), 500)
    assert "internal error" in error and "secret" not in error
    assert any("secret detail" in r.getMessage() or "secret detail" in (r.exc_text or "") for r in caplog.records)


class _Broken:
    name = "broken"

    def __call__(self, batch):
        raise RuntimeError("secret detail of a bug")


# ---- health and docs


def test_health_and_docs(client, tagger):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["tags"] == len(tagger.labels) and h["backend"] == "onnx"
    assert h["index"] is False and h["index_size"] == 0
    assert h["heads"] == {head: len(ix) for head, ix in tagger.labels.heads.items()}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/tag", "/api/similar", "/api/health", "/api/image/{id}", "/api/thumb/{id}"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert client.get("/static/app.js").status_code == 200


# ---- similar images


def test_similar_by_image_and_by_id(indexed, images, index):
    query = images[3]
    r = post_image(indexed, query, url="/api/similar", params={"k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["neighbours"]
    assert len(hits) == 5
    assert hits[0]["id"] == f"set/{query.name}" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0]["thumb"] == f"/api/thumb/set%2F{query.name}" and hits[0]["image"] == f"/api/image/set%2F{query.name}"
    assert hits[0]["name"] == query.name and "path" not in hits[0]

    more = indexed.post("/api/similar", data={"id": f"set/{query.name}"}, params={"k": 3}).json()["neighbours"]
    assert len(more) == 3 and f"set/{query.name}" not in [h["id"] for h in more]
    assert [h["id"] for h in more] == [h["id"] for h in hits[1:4]]
    assert indexed.get("/api/health").json()["index_size"] == len(index)


def test_similar_refusals(client, indexed, images):
    assert "no index" in refused(post_image(client, images[0], url="/api/similar"), 404)
    assert "either" in refused(indexed.post("/api/similar", data={}), 422)
    assert "no image" in refused(indexed.post("/api/similar", data={"id": "nope"}), 404)


def test_images_are_served_by_id_only(indexed, images):
    path = images[0]
    r = indexed.get(f"/api/image/set%2F{path.name}")
    assert r.status_code == 200 and r.content == path.read_bytes()
    assert indexed.get(f"/api/image/set/{path.name}").content == path.read_bytes()
    thumb = indexed.get(f"/api/thumb/set%2F{path.name}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= 256
    bad_ids = ["nope", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", path.name, str(path), str(path).replace("/", "%2F")]
    for bad in bad_ids:
        for kind in ("image", "thumb"):
            r = indexed.get(f"/api/{kind}/{bad}")
            assert r.status_code == 404, (kind, bad)
            assert r.json()["error"] and r.content != path.read_bytes()
    assert indexed.get("/api/image/../../etc/passwd").status_code == 404
    assert indexed.get(f"/api/image/set/../{path.name}").status_code == 404


# ---- batching


def test_concurrent_requests_share_a_forward_pass(synth_bundle, tagger, images):
    app = create_app(ServeConfig(model=str(synth_bundle), max_batch=16, max_wait_ms=200), tagger=tagger)
    paths = images[:6]

    async def send_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            posts = [c.post("/api/tag", files={"file": (p.name, p.read_bytes())}) for p in paths]
            return await asyncio.gather(*posts)

    answers = asyncio.run(send_all())
    stats = app.state.serve.batcher.stats
    assert stats.images == len(paths) and stats.max_batch > 1 and stats.batches < len(paths)
    expected = tagger.predict(paths)
    for r, probs in zip(answers, expected, strict=True):  # each answer is its own image's, batched or not
        assert r.status_code == 200
        for head, tags in tagger.scores(probs).items():
            for tag, score in tags.items():
                assert r.json()["scores"][head][tag] == pytest.approx(score, abs=1e-5)


def test_batcher_groups_what_arrives_together_up_to_max_batch():
    seen = []

    def forward(batch):
        seen.append(len(batch))
        return batch.sum(axis=1, keepdims=True), batch * 2

    async def go():
        b = Batcher(forward, max_batch=4, max_wait_ms=20)
        out = await asyncio.gather(*(b.submit(np.full(3, i, np.float32)) for i in range(10)))
        await b.stop()
        return b, out

    b, out = asyncio.run(go())
    assert seen == [4, 4, 2] and b.stats.max_batch == 4 and b.stats.images == 10
    for i, (probs, feats) in enumerate(out):
        assert probs.tolist() == [3.0 * i] and feats.tolist() == [2.0 * i] * 3


def test_batcher_passes_a_failure_to_each_request_and_goes_on():
    calls = []

    def forward(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return batch, None

    async def go():
        b = Batcher(forward, max_batch=8, max_wait_ms=5)
        first = await asyncio.gather(*(b.submit(np.zeros(2)) for _ in range(3)), return_exceptions=True)
        second = await b.submit(np.ones(2))
        await b.stop()
        return first, second

    first, second = asyncio.run(go())
    assert all(isinstance(e, RuntimeError) for e in first) and calls == [3, 1]
    assert second[0].tolist() == [1.0, 1.0] and second[1] is None


def test_max_batch_1_runs_one_pass_per_request():
    seen = []

    async def go():
        b = Batcher(lambda x: (seen.append(len(x)) or x, None), max_batch=1, max_wait_ms=50)
        await asyncio.gather(*(b.submit(np.zeros(1)) for _ in range(5)))
        await b.stop()

    asyncio.run(go())
    assert seen == [1] * 5


# ---- starting the server


def test_an_index_of_another_model_is_refused(tagger, tmp_path):
    VectorIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"]).save(tmp_path / "idx")
    with pytest.raises(UserError, match="3-d vectors"):
        open_index(str(tmp_path / "idx"), tagger)


def test_serve_cli_refuses_a_missing_index_in_one_line(synth_bundle, tmp_path):
    missing = tmp_path / "no-index"
    cmd = [sys.executable, "-m", "illust2vec.cli", "serve", "--model", str(synth_bundle), "--index", str(missing)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "no such index" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "field, value",
    [("port", 70000), ("max_upload_mb", 0), ("max_batch", 0), ("max_wait_ms", -1), ("backend", "tpu"), ("k", 0)],
)
def test_a_bad_serve_config_is_one_user_error_naming_the_field(field, value):
    with pytest.raises(UserError, match=field.replace("_", "-")):
        ServeConfig(model="m", **{field: value})
