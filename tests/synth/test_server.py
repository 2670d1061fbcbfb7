"""The fake Danbooru: search and paging as the real site does them, files that match their md5, and faults."""

from __future__ import annotations

import hashlib
import io
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from illust2vec.errors import UserError
from illust2vec.synth.board import SAMPLE_WIDTH
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.faults import Faults
from illust2vec.synth.server import CONTENT_TYPES, start_board

# Enough deleted, banned, non-image and child posts that every kind appears on a 150-post board.
CONFIG = SynthConfig(
    posts=150,
    seed=7,
    deleted_fraction=0.08,
    banned_fraction=0.05,
    non_image_fraction=0.05,
    child_fraction=0.1,
    max_size=1200,
)
# Small pictures for tests that need many posts or many requests but look at no pixels.
TINY = SynthConfig(posts=230, seed=3, min_size=64, max_size=128)
POST_FIELDS = {
    "id", "created_at", "updated_at", "uploader_id", "score", "up_score", "down_score", "fav_count", "source",
    "md5", "rating", "image_width", "image_height", "tag_string", "tag_string_general", "tag_string_character",
    "tag_string_copyright", "tag_string_artist", "tag_string_meta", "tag_count", "tag_count_general",
    "tag_count_character", "tag_count_copyright", "tag_count_artist", "tag_count_meta", "file_ext", "file_size",
    "parent_id", "has_children", "has_active_children", "has_visible_children", "is_pending", "is_flagged",
    "is_deleted", "is_banned", "has_large", "pixiv_id", "bit_flags", "last_comment_bumped_at", "last_noted_at",
    "last_commented_at", "approver_id", "file_url", "large_file_url", "preview_file_url",
}  # fmt: skip
FILE_FIELDS = {"md5", "file_url", "large_file_url", "preview_file_url"}


@pytest.fixture(scope="module")
def server():
    with start_board(CONFIG) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def tiny():
    with start_board(TINY, warm=False) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        yield s, c


def ids_of(client: httpx.Client, **params) -> list[int]:
    response = client.get("/posts.json", params=params)
    assert response.status_code == 200, response.text
    return [p["id"] for p in response.json()]


def test_board_has_every_kind_of_post(server):
    posts = server.board.posts
    assert any(p.is_deleted for p in posts) and any(p.is_banned for p in posts)
    assert any(not p.is_image for p in posts) and any(p.parent_id for p in posts)
    assert any(p.is_image and p.width > SAMPLE_WIDTH for p in posts)
    assert any(p.is_image and p.width <= SAMPLE_WIDTH for p in posts)


# Paging


def test_before_paging_from_the_top_walks_every_post_once(server, client):
    seen: list[int] = []
    page = ids_of(client, limit=37)
    while page:
        assert page == sorted(page, reverse=True)
        seen += page
        page = ids_of(client, limit=37, page=f"b{page[-1]}")
    assert seen == [p.id for p in reversed(server.board.posts)]


def test_after_paging_walks_every_post_once(server, client):
    seen: list[int] = []
    after = 0
    while page := ids_of(client, limit=37, page=f"a{after}"):
        assert page == sorted(page, reverse=True)  # Danbooru answers a<id> newest first too
        seen += page
        after = page[0]
    assert sorted(seen) == [p.id for p in server.board.posts]
    assert len(set(seen)) == len(seen)


def test_after_takes_the_closest_ids(server, client):
    ids = [p.id for p in server.board.posts]
    assert ids_of(client, limit=5, page=f"a{ids[9]}") == ids[10:15][::-1]


def test_numbered_pages_newest_first_and_order_id(server, client):
    ids = [p.id for p in server.board.posts]
    assert ids_of(client) == ids[::-1][:20]
    assert ids_of(client, page=2, limit=30) == ids[::-1][30:60]
    ascending = []
    for page in range(1, 10):
        ascending += ids_of(client, tags="order:id", page=page, limit=40)
    assert ascending == ids
    assert ids_of(client, tags="order:id_desc", limit=5) == ids[::-1][:5]


def test_limit_is_capped_at_200(tiny):
    server, client = tiny
    assert len(server.board.posts) > 200
    assert len(ids_of(client, limit=1000)) == 200
    assert len(ids_of(client, limit=0)) == 1


def test_page_beyond_1000_is_gone(client):
    response = client.get("/posts.json", params={"page": 1001})
    assert response.status_code == 410
    assert response.json() == {
        "success": False,
        "error": "PaginationExtension::PaginationError",
        "message": "You cannot go beyond page 1000. Please narrow your search terms.",
    }
    assert ids_of(client, page=1000) == []


# Searches


def test_id_ranges(server, client):
    ids = [p.id for p in server.board.posts]
    a, b = ids[10], ids[30]
    assert sorted(ids_of(client, tags=f"id:{a}..{b}", limit=200)) == ids[10:31]
    assert sorted(ids_of(client, tags=f"id:>{b}", limit=200)) == ids[31:]
    assert sorted(ids_of(client, tags=f"id:>={b}", limit=200)) == ids[30:]
    assert sorted(ids_of(client, tags=f"id:<{a}", limit=200)) == ids[:10]
    assert sorted(ids_of(client, tags=f"id:<={a}", limit=200)) == ids[:11]
    assert ids_of(client, tags=f"id:{a}") == [a]
    # A crawler's shard: an id range walked with b<id> pages.
    seen, page = [], ids_of(client, tags=f"id:{a}..{b}", limit=7)
    while page:
        seen += page
        page = ids_of(client, tags=f"id:{a}..{b}", limit=7, page=f"b{page[-1]}")
    assert seen == ids[10:31][::-1]


def test_rating(server, client):
    by_rating = {r: [p.id for p in server.board.posts if p.rating == r] for r in "gsqe"}
    for rating, full in zip("gsqe", ("general", "sensitive", "questionable", "explicit"), strict=True):
        assert sorted(ids_of(client, tags=f"rating:{rating}", limit=200)) == by_rating[rating]
        assert sorted(ids_of(client, tags=f"rating:{full}", limit=200)) == by_rating[rating]
    assert sorted(ids_of(client, tags="rating:q,e", limit=200)) == sorted(by_rating["q"] + by_rating["e"])
    assert sorted(ids_of(client, tags="-rating:g", limit=200)) == sorted(
        by_rating["s"] + by_rating["q"] + by_rating["e"]
    )


def test_plain_tags_negation_and_wildcards(server, client):
    posts = server.board.posts
    has = {p.id: set(p.tag_string.split()) for p in posts}
    assert sorted(ids_of(client, tags="solo", limit=200)) == [i for i in has if "solo" in has[i]]
    assert sorted(ids_of(client, tags="-solo", limit=200)) == [i for i in has if "solo" not in has[i]]
    both = [i for i in has if {"solo", "smile"} <= has[i]]
    assert sorted(ids_of(client, tags="solo smile order:id rating:g,s,q,e", limit=200)) == both
    hair = [i for i in has if any(t.endswith("_hair") for t in has[i])]
    assert sorted(ids_of(client, tags="*_hair", limit=200)) == hair


def test_more_than_two_tags_are_refused(client):
    response = client.get("/posts.json", params={"tags": "solo smile blush"})
    assert response.status_code == 422
    assert response.json() == {
        "success": False,
        "error": "PostQuery::TagLimitError",
        "message": "You cannot search for more than 2 tags at a time. "
        "Upgrade your account to search for more tags at once.",
    }
    assert client.get("/counts/posts.json", params={"tags": "solo -smile blush"}).status_code == 422


def test_counts(server, client):
    assert client.get("/counts/posts.json").json() == {"counts": {"posts": len(server.board.posts)}}
    general = sum(p.rating == "g" for p in server.board.posts)
    assert client.get("/counts/posts.json", params={"tags": "rating:g"}).json() == {"counts": {"posts": general}}


@pytest.mark.parametrize(
    "path, params",
    [
        ("/posts.json", {"limit": "many"}),
        ("/posts.json", {"page": "x1"}),
        ("/posts.json", {"tags": "id:abc"}),
        ("/posts.json", {"tags": "rating:z"}),
        ("/tags.json", {"search[category]": "general"}),
    ],
)
def test_bad_parameters_get_a_json_message(client, path, params):
    response = client.get(path, params=params)
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["success"] is False and body["message"]


def test_unknown_paths_are_404_json(client):
    for path in ("/nothing", "/posts/abc.json", "/original/00/00/00000000000000000000000000000000.jpg"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["error"] == "ActiveRecord::RecordNotFound"


# Post objects


def test_post_by_id_and_missing(server, client):
    post = server.board.posts[40]
    response = client.get(f"/posts/{post.id}.json")
    assert response.status_code == 200
    listed = [p for p in client.get("/posts.json", params={"tags": f"id:{post.id}"}).json()]
    assert listed == [response.json()]
    missing = max(p.id for p in server.board.posts) + 1
    response = client.get(f"/posts/{missing}.json")
    assert response.status_code == 404
    assert response.json() == {
        "success": False,
        "error": "ActiveRecord::RecordNotFound",
        "message": "That record was not found.",
    }


def test_post_fields(server, client):
    posts = {p.id: p for p in server.board.posts}
    children = {p.parent_id for p in server.board.posts if p.parent_id}
    for row in client.get("/posts.json", params={"limit": 200}).json():
        post = posts[row["id"]]
        hidden = post.is_deleted or post.is_banned
        assert set(row) == (POST_FIELDS - FILE_FIELDS if hidden else POST_FIELDS)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", row["created_at"])
        assert row["tag_string"] == post.tag_string
        for category, names in post.tags.items():
            assert row[f"tag_string_{category}"] == " ".join(sorted(names))
            assert row[f"tag_count_{category}"] == len(names)
        assert row["tag_count"] == len(post.tag_string.split())
        assert row["file_size"] == server.board.file_size(post)
        assert (row["image_width"], row["image_height"], row["rating"]) == (post.width, post.height, post.rating)
        assert row["has_children"] == (post.id in children)
        assert row["up_score"] + row["down_score"] == row["score"] == post.score
        assert row["has_large"] == (post.is_image and post.width > SAMPLE_WIDTH)
        if hidden:
            continue
        md5 = server.board.md5(post)
        assert row["md5"] == md5
        assert row["file_url"] == f"{server.url}/original/{md5[:2]}/{md5[2:4]}/{md5}.{post.file_ext}"
        assert row["preview_file_url"] == f"{server.url}/180x180/{md5[:2]}/{md5[2:4]}/{md5}.jpg"
        if row["has_large"]:
            assert row["large_file_url"] == f"{server.url}/sample/{md5[:2]}/{md5[2:4]}/sample-{md5}.jpg"
        else:
            assert row["large_file_url"] == row["file_url"]


def test_hidden_posts_are_listed_without_files(server, client):
    hidden = [p.id for p in server.board.posts if p.is_deleted or p.is_banned]
    rows = {row["id"]: row for row in client.get("/posts.json", params={"limit": 200}).json()}
    for post_id in hidden:
        assert not FILE_FIELDS & set(rows[post_id])
        assert rows[post_id]["is_deleted"] or rows[post_id]["is_banned"]


# Files


def test_files_match_their_md5(server, client):
    for row in client.get("/posts.json", params={"limit": 200}).json():
        if "file_url" not in row:
            continue
        response = client.get(row["file_url"])
        assert response.status_code == 200
        assert hashlib.md5(response.content).hexdigest() == row["md5"]
        assert int(response.headers["content-length"]) == row["file_size"] == len(response.content)
        assert response.headers["content-type"] == CONTENT_TYPES[row["file_ext"]]
    assert server.stats["bad_md5"] == 0


def test_samples_and_previews_decode(server, client):
    rows = [row for row in client.get("/posts.json", params={"limit": 200}).json() if "file_url" in row]
    large = [row for row in rows if row["has_large"]][:3]
    small = [row for row in rows if not row["has_large"]][:3]
    assert large and small
    for row in large:
        image = Image.open(io.BytesIO(client.get(row["large_file_url"]).content))
        assert image.format == "JPEG" and image.width == SAMPLE_WIDTH
    for row in large + small + [row for row in rows if row["file_ext"] in ("zip", "mp4")]:
        response = client.get(row["preview_file_url"])
        assert response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG" and max(image.size) <= 180
    # A post without a sample has no sample file, and a file under another extension is not there.
    md5 = small[0]["md5"]
    assert client.get(f"/sample/{md5[:2]}/{md5[2:4]}/sample-{md5}.jpg").status_code == 404
    other = "png" if small[0]["file_ext"] != "png" else "jpg"
    assert client.get(f"/original/{md5[:2]}/{md5[2:4]}/{md5}.{other}").status_code == 404
    assert client.get(f"/original/{md5[2:4]}/{md5[:2]}/{md5}.{small[0]['file_ext']}").status_code == 404


def test_head_sends_headers_only(server, client):
    post = next(p for p in reversed(server.board.posts) if p.is_image and not (p.is_deleted or p.is_banned))
    row = client.get(f"/posts/{post.id}.json").json()
    response = client.head(row["file_url"])
    assert response.status_code == 200 and response.content == b""
    assert int(response.headers["content-length"]) == row["file_size"]


def test_files_are_found_before_any_page_asked_for_them():
    # A crawler that kept file URLs from an earlier run of the same board, against a fresh, cold server.
    with start_board(TINY, warm=False) as server:
        post = next(p for p in server.board.posts[:5] if p.is_image and not (p.is_deleted or p.is_banned))
        md5 = server.board.md5(post)
        response = httpx.get(f"{server.url}/original/{md5[:2]}/{md5[2:4]}/{md5}.{post.file_ext}")
        assert response.status_code == 200 and hashlib.md5(response.content).hexdigest() == md5


# Tags


def test_tags(server, client):
    names = {t for p in server.board.posts for t in p.tag_string.split()}
    rows = client.get("/tags.json", params={"limit": 1000}).json()
    assert {row["name"] for row in rows} == names
    assert set(rows[0]) == {"id", "name", "post_count", "category", "created_at", "updated_at", "is_deprecated"}
    assert [row["id"] for row in rows] == sorted((row["id"] for row in rows), reverse=True)  # default: newest
    counts = {t: sum(t in p.tag_string.split() for p in server.board.posts) for t in names}
    assert all(row["post_count"] == counts[row["name"]] for row in rows)

    hair = client.get("/tags.json", params={"search[name_matches]": "*_hair", "limit": 1000}).json()
    assert {row["name"] for row in hair} == {t for t in names if t.endswith("_hair")}
    by_count = client.get("/tags.json", params={"search[order]": "count", "limit": 5}).json()
    assert [row["post_count"] for row in by_count] == sorted(counts.values(), reverse=True)[:5]
    by_name = client.get("/tags.json", params={"search[order]": "name", "limit": 30, "page": 2}).json()
    assert [row["name"] for row in by_name] == sorted(names)[30:60]
    characters = client.get("/tags.json", params={"search[category]": 4, "limit": 1000}).json()
    expected = {t for p in server.board.posts for t in p.tags["character"]}
    assert {row["name"] for row in characters} == expected
    assert all(row["category"] == 4 for row in characters)


# Faults


def fault_server(faults: Faults, posts: int = 20):
    return start_board(SynthConfig(posts=posts, seed=5, min_size=64, max_size=128), faults=faults, warm=False)


def test_faults_are_off_by_default(server):
    stats = server.stats
    assert stats["requests"] > 0
    faults = ("rate_limited", "throttled", "errors", "slow", "truncated", "bad_md5", "html", "cut_json")
    assert all(stats[k] == 0 for k in faults)


def test_throttle_answers_429_with_retry_after():
    faults = Faults(throttle_rate=0.3, retry_after=2, seed=1)
    with fault_server(faults) as server, httpx.Client(base_url=server.url) as client:
        statuses = [client.get("/counts/posts.json") for _ in range(60)]
    throttled = [n for n, r in enumerate(statuses, 1) if r.status_code == 429]
    assert throttled == [n for n in range(1, 61) if faults.fires("throttle", n)]
    assert 6 <= len(throttled) <= 30
    assert all(statuses[n - 1].headers["retry-after"] == "2" for n in throttled)
    assert all(r.status_code == 200 for r in statuses if r.status_code != 429)
    assert server.stats["throttled"] == len(throttled)


def test_rate_limit_counts_requests_per_second():
    with fault_server(Faults(rate_limit=5)) as server, httpx.Client(base_url=server.url) as client:
        responses = [client.get("/counts/posts.json") for _ in range(8)]
        assert [r.status_code for r in responses[:5]] == [200] * 5
        # The sixth came within a second of the first (loopback answers in milliseconds).
        limited = [r for r in responses[5:] if r.status_code == 429]
        assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
        time.sleep(int(limited[-1].headers["retry-after"]))
        assert client.get("/counts/posts.json").status_code == 200
        assert server.stats["rate_limited"] == len(limited)


def test_errors_fire_at_the_configured_rate():
    faults = Faults(error_rate=0.25, seed=2)
    with fault_server(faults) as server, httpx.Client(base_url=server.url) as client:
        responses = [client.get("/posts.json", params={"limit": 1}) for _ in range(80)]
    failed = [n for n, r in enumerate(responses, 1) if r.status_code >= 500]
    assert failed == [n for n in range(1, 81) if faults.fires("error", n)]
    assert 10 <= len(failed) <= 30
    assert {responses[n - 1].status_code for n in failed} <= {500, 502, 503}
    assert len({responses[n - 1].status_code for n in failed}) > 1
    assert server.stats["errors"] == len(failed)


def test_slow_answers_are_late():
    faults = Faults(slow_rate=0.5, slow_seconds=0.3, seed=3)
    slow = [n for n in range(1, 7) if faults.fires("slow", n)]
    assert slow and len(slow) < 6
    with fault_server(faults) as server, httpx.Client(base_url=server.url) as client:
        for n in range(1, 7):
            start = time.perf_counter()
            assert client.get("/counts/posts.json").status_code == 200
            if n in slow:
                assert time.perf_counter() - start >= 0.3
        assert server.stats["slow"] == len(slow)


def test_truncated_bodies_end_early():
    with fault_server(Faults(truncate_rate=1.0, paths="files")) as server, httpx.Client(base_url=server.url) as client:
        rows = client.get("/posts.json", params={"limit": 5}).json()  # the API is not faulted
        row = next(row for row in rows if "file_url" in row)
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(row["file_url"])
        # On the wire: the full Content-Length, fewer bytes, then the connection closes.
        path = row["file_url"].removeprefix(server.url)
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])
        assert length == row["file_size"] and 0 < len(body) < length
        assert server.stats["truncated"] == 2


def test_html_rate_answers_the_api_with_a_challenge_page_and_200():
    with fault_server(Faults(html_rate=1.0)) as server, httpx.Client(base_url=server.url) as client:
        page = client.get("/posts.json", params={"limit": 5})
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "<title>Just a moment...</title>" in page.text
        with pytest.raises(ValueError):
            page.json()
        assert server.stats["html"] == 1
    # Files are never answered with it: a file's bytes are checked against its md5 anyway.
    with fault_server(Faults(html_rate=1.0, paths="files")) as server, httpx.Client(base_url=server.url) as client:
        rows = client.get("/posts.json", params={"limit": 5}).json()
        row = next(row for row in rows if "file_url" in row)
        assert client.get(row["file_url"]).headers["Content-Type"] in CONTENT_TYPES.values()
        assert server.stats["html"] == 0


def test_cut_json_rate_sends_half_the_json_with_a_clean_end():
    with fault_server(Faults()) as server, httpx.Client(base_url=server.url) as client:
        whole, where = client.get("/posts.json", params={"limit": 5}).content, server.url
    with fault_server(Faults(cut_json_rate=1.0)) as server, httpx.Client(base_url=server.url) as client:
        cut = client.get("/posts.json", params={"limit": 5})  # no RemoteProtocolError: the answer ends cleanly
        assert cut.status_code == 200 and int(cut.headers["Content-Length"]) == len(cut.content)
        whole = whole.replace(where.encode(), server.url.encode())  # the file URLs name the server's port
        assert cut.content == whole[: len(whole) // 2]
        with pytest.raises(ValueError):
            cut.json()
        missing = client.get("/posts/999999.json")  # only 200 answers are cut
        assert missing.status_code == 404 and missing.json()["success"] is False
        assert server.stats["cut_json"] == 1 and server.stats["truncated"] == 0


def test_fakebooru_serve_takes_the_fault_options(i2v, monkeypatch):
    import illust2vec.synth.server as server_module

    seen = []
    monkeypatch.setattr(server_module, "serve_board", lambda cfg, **kw: seen.append(kw["faults"]))
    code, _, _ = i2v("fakebooru", "serve", "--html-rate", "0.2", "--cut-json-rate", "0.1", "--fault-seed", "7")
    assert code in (0, None) and [(f.html_rate, f.cut_json_rate, f.seed) for f in seen] == [(0.2, 0.1, 7)]
    code, out, err = i2v("fakebooru", "serve", "--html-rate", "2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--html-rate" in lines[0], err


def test_bad_md5_files_are_stable():
    faults = Faults(bad_md5_rate=0.5, seed=4)
    with fault_server(faults, posts=30) as server, httpx.Client(base_url=server.url) as client:
        rows = [row for row in client.get("/posts.json", params={"limit": 30}).json() if "file_url" in row]
        bad = [row for row in rows if faults.is_bad_md5(row["id"])]
        assert bad and len(bad) < len(rows)
        for row in rows:
            first, again = client.get(row["file_url"]).content, client.get(row["file_url"]).content
            assert first == again and len(first) == row["file_size"]
            assert (hashlib.md5(first).hexdigest() != row["md5"]) == faults.is_bad_md5(row["id"])
        assert server.stats["bad_md5"] == 2 * len(bad)


def test_paths_selects_what_faults_apply_to():
    with fault_server(Faults(error_rate=1.0, paths="files")) as server, httpx.Client(base_url=server.url) as client:
        rows = client.get("/posts.json", params={"limit": 5}).json()
        assert client.get("/counts/posts.json").status_code == 200
        row = next(row for row in rows if "file_url" in row)
        assert client.get(row["file_url"]).status_code >= 500
        assert server.stats["errors"] == 1 and server.stats["files"] == 1


def test_faults_are_checked():
    with pytest.raises(UserError, match="error_rate"):
        Faults(error_rate=1.5)
    with pytest.raises(UserError, match="paths"):
        Faults(paths="images")
    with pytest.raises(UserError, match="retry_after"):
        Faults(retry_after=-1)


def test_close_ends_keep_alive_connections():
    server = fault_server(Faults())
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/counts/posts.json").status_code == 200
        server.close()
        with pytest.raises(httpx.TransportError):
            client.get("/counts/posts.json")
    server.close()  # idempotent


def test_serve_board_prints_its_url_first_and_stops_on_ctrl_c():
    code = (
        "from illust2vec.synth.cast import SynthConfig; from illust2vec.synth.server import serve_board; "
        "serve_board(SynthConfig(posts=30, min_size=64, max_size=128))"
    )
    # Ctrl-C as a terminal gives it: the child starts with SIGINT at its default, whatever the test process inherited
    # (a CI runner's background job, or an earlier test's library, can leave SIGINT ignored, and an ignored signal
    # stays ignored across exec).
    reset = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, preexec_fn=reset)
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert httpx.get(f"{url}/counts/posts.json").json() == {"counts": {"posts": 30}}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


# What keeps the first page of a big board quick (bench/fakebooru.py measures it): a page renders its own posts only.


def test_a_page_renders_only_its_own_posts():
    with start_board(SynthConfig(posts=2000, seed=0), warm=False) as server:
        response = httpx.get(f"{server.url}/posts.json", timeout=60)
        assert response.status_code == 200 and len(response.json()) == 20
        assert sorted(server._md5s) == sorted(row["id"] for row in response.json())
