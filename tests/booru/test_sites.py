"""The site tables against real answers of Danbooru, Moebooru and Gelbooru, and requests, auth and key loading."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from illust2vec.booru.sites import (
    ENV_API_KEY,
    ENV_LOGIN,
    RATINGS,
    SITES,
    Auth,
    auth_params,
    flat_tags,
    load_auth,
    moebooru_password_hash,
    page_request,
    parse_page,
    parse_tags,
    parse_time,
    tag_requests,
    to_post,
)
from illust2vec.errors import UserError

# The repo and shared/ sit side by side (here and in CI); the real answers are read in place, never copied.
REAL = Path(__file__).resolve().parents[3] / "shared/fixtures/real/booru-api"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real booru answers not found at {REAL}")
DANBOORU, MOEBOORU, GELBOORU = SITES["danbooru"], SITES["moebooru"], SITES["gelbooru"]


def load(name: str):
    return json.loads((REAL / name).read_text(encoding="utf-8"))


def posts_of(name: str) -> list[dict]:
    data = load(name)
    return [data] if isinstance(data, dict) and "id" in data else parse_page(SITES[name.split("/")[0]], data)


def by_id(site, name: str, categories=None) -> dict:
    return {p.id: p for p in (to_post(site, raw, categories) for raw in posts_of(name))}


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


# Every real post parses


@needs_real
@pytest.mark.parametrize(
    "name",
    [
        "danbooru/any2feed_danbooru_hidden-file_post_REDACTED.json",
        "danbooru/any2feed_danbooru_posts_2023-03-14_filtered.json",
        "danbooru/booru-rs_danbooru_post_6148688.json",
        "danbooru/booru-rs_danbooru_posts_2023-03.json",
        "danbooru/boorusphere_danbooru_posts_2023-06_media_asset.json",
        "danbooru/grabber_danbooru_posts_2020-07-26.json",
        "moebooru/booru-rs_konachan_post_354323.json",
        "moebooru/booru-rs_konachan_posts_2023-03.json",
        "moebooru/boorusphere_konachan_posts_2023-06.json",
        "moebooru/grabber_behoimi_danbooru1_posts_2016-08.json",
        "gelbooru/booru-rs_gelbooru_posts_2023-03_general-only.json",
        "gelbooru/boorusphere_gelbooru_posts_2023.json",
    ],
)
def test_every_real_post_parses(name):
    site = SITES[name.split("/")[0]]
    raws = posts_of(name)
    assert raws
    for raw in raws:
        post = to_post(site, raw)
        assert post.id == raw["id"] and post.site == site.name
        assert post.rating in RATINGS
        assert post.created_at is not None and post.created_at.utcoffset().total_seconds() == 0
        assert post.width > 0 and post.height > 0 and post.file_ext
        if post.has_file:
            assert len(post.md5) == 32 and post.file_url.startswith(("https://", "http://"))
        assert sum(map(len, (post.tags_general, post.tags_character, post.tags_copyright))) > 0
        assert post.parent_id is None or post.parent_id > 0


# Danbooru


@needs_real
def test_danbooru_fields_and_tag_categories():
    post = by_id(DANBOORU, "danbooru/booru-rs_danbooru_posts_2023-03.json")[6148688]
    assert post.md5 == "dc123eec97d06c3aa9cd53d65a2c7abf"
    assert post.file_url == "https://cdn.donmai.us/original/dc/12/dc123eec97d06c3aa9cd53d65a2c7abf.jpg"
    assert post.rating == "g" and post.file_ext == "jpg" and post.is_image and post.has_file
    assert post.created_at == utc(2023, 3, 17, 7, 50, 48, 762000)  # -04:00 in the answer
    assert post.tags_character == ("lady_zuri",) and post.tags_copyright == ("original",)
    assert post.tags_artist == ("ekz_(robotekz)",) and post.tags_meta == ("absurdres", "highres")
    assert "bodysuit" in post.tags_general and "highres" not in post.tags_general
    assert post.parent_id is None and post.site == "danbooru"


@needs_real
def test_danbooru_hidden_file_ugoira_and_parents():
    hidden = to_post(DANBOORU, load("danbooru/any2feed_danbooru_hidden-file_post_REDACTED.json"))
    assert hidden.id == 6141706 and hidden.md5 is None and hidden.file_url is None and not hidden.has_file
    assert hidden.rating == "e" and hidden.file_ext == "jpg"
    posts = by_id(DANBOORU, "danbooru/any2feed_danbooru_posts_2023-03-14_filtered.json")
    assert len(posts) == 93
    ugoira = posts[6141439]
    assert ugoira.file_ext == "zip" and not ugoira.is_image and ugoira.has_file
    assert ugoira.file_url.endswith("/2b9ba83f79690ea5431b2003020378ad.zip")  # the original, not the webm sample
    assert ugoira.tags_meta == ("animated", "commentary", "ugoira")
    assert posts[6141669].parent_id == 6141675
    assert posts[6141736].created_at == utc(2023, 3, 14, 10, 59, 28, 614000)


def test_danbooru_deleted_banned_and_relative_urls():
    raw = {"id": 5, "md5": "a" * 32, "file_url": "/data/aa/aa/x.jpg", "file_ext": "JPG", "rating": "q"}
    post = to_post(DANBOORU, raw, base_url="https://danbooru.donmai.us")
    assert post.file_url == "https://danbooru.donmai.us/data/aa/aa/x.jpg" and post.file_ext == "jpg"
    assert to_post(DANBOORU, raw | {"file_url": "//cdn.donmai.us/x.png"}).file_url == "https://cdn.donmai.us/x.png"
    for flag in ("is_deleted", "is_banned"):
        hidden = to_post(DANBOORU, raw | {flag: True})
        assert hidden.md5 is None and hidden.file_url is None and not hidden.has_file
    bare = to_post(DANBOORU, {"id": 7})
    assert (bare.rating, bare.file_ext, bare.created_at, bare.width, bare.tags_general) == ("", "", None, 0, ())


# Moebooru


@needs_real
def test_moebooru_fields_rating_and_flat_tags():
    categories = {"hakuurei_amano": 1, "kamitsubaki_studio": 3, "isekai_joucho": 4, "scenic": 5}
    post = by_id(MOEBOORU, "moebooru/booru-rs_konachan_posts_2023-03.json", categories)[354323]
    assert post.md5 == "e53d6e7c9046076fdb2ce4ab07e9f0c5" and post.has_file
    assert post.file_ext == "png" and post.is_image  # konachan sends no file_ext: it comes from the URL
    assert post.file_url.startswith("https://konachan.com/image/e53d6e7c9046076fdb2ce4ab07e9f0c5/")
    assert post.rating == "g"  # Moebooru's safe
    assert post.created_at == utc(2023, 3, 17, 5, 9, 24)  # unix 1679029764
    assert (post.width, post.height) == (4096, 2317)
    assert post.tags_artist == ("hakuurei_amano",) and post.tags_copyright == ("kamitsubaki_studio",)
    assert post.tags_character == ("isekai_joucho",) and post.tags_meta == ("scenic",)
    assert post.tags_general == ("building", "long_hair")  # tags without a category are general
    behoimi = by_id(MOEBOORU, "moebooru/grabber_behoimi_danbooru1_posts_2016-08.json")[631557]
    assert behoimi.created_at == utc(2016, 8, 19, 15, 21, 24, 423930)  # Danbooru 1: {"s": ..., "n": ...}


def test_moebooru_deleted_and_ratings():
    raw = {"id": 9, "tags": "a b", "md5": "b" * 32, "status": "deleted", "rating": "q", "created_at": 0}
    post = to_post(MOEBOORU, raw)
    assert post.md5 is None and post.file_url is None and not post.has_file
    assert post.rating == "q" and post.created_at == utc(1970, 1, 1)
    assert [to_post(MOEBOORU, raw | {"rating": r}).rating for r in ("s", "q", "e", "x")] == ["g", "q", "e", ""]


# Gelbooru


@needs_real
def test_gelbooru_fields_unescaping_and_parents():
    posts = by_id(GELBOORU, "gelbooru/booru-rs_gelbooru_posts_2023-03_general-only.json", {"kafuu_chino": 4})
    post = posts[8329156]
    assert post.md5 == "b4a3a01ffbbd22fb03d60a35754985f8" and post.file_ext == "jpg"
    assert post.file_url == "https://img3.gelbooru.com/images/b4/a3/b4a3a01ffbbd22fb03d60a35754985f8.jpg"
    assert post.rating == "g" and post.parent_id is None  # parent_id 0
    assert post.created_at == utc(2023, 3, 14, 0, 0, 33)  # "Mon Mar 13 19:00:33 -0500 2023"
    assert post.tags_character == ("kafuu_chino",) and "kafuu_chino" not in post.tags_general
    assert ">_<" in posts[8299561].tags_general and "&gt;_&lt;" not in posts[8299561].tags_general
    old = by_id(GELBOORU, "gelbooru/boorusphere_gelbooru_posts_2023.json")
    assert {p.rating for p in old.values()} == {"g"}  # "safe", before Gelbooru's 2022 split
    assert "rubik's_cube" in old[1943185].tags_general
    assert old[1901145].source == "http://www.pixiv.net/member_illust.php?mode=medium&illust_id=28700131"
    assert old[1901145].file_ext == "png" and old[1884298].file_ext == "jpeg" and old[1884298].is_image
    assert old[1943185].created_at == utc(2013, 7, 20, 11, 5, 33)


def test_gelbooru_ratings_and_times():
    ratings = ("general", "sensitive", "questionable", "explicit", "safe", "s", "q", "e")
    assert [to_post(GELBOORU, {"id": 1, "rating": r}).rating for r in ratings] == list("gsqeggqe")
    assert parse_time("Sat Mar 04 19:16:16 -0600 2023") == utc(2023, 3, 5, 1, 16, 16)
    assert parse_time("Tue Jan 02 03:04:05 +0900 2024") == utc(2024, 1, 1, 18, 4, 5)
    assert parse_time("2023-03-14T06:59:28.614-04:00") == utc(2023, 3, 14, 10, 59, 28, 614000)
    assert parse_time("2020-01-01T00:00:00") == utc(2020, 1, 1)  # no offset: taken as UTC
    assert parse_time(None) is None and parse_time("") is None and parse_time("yesterday") is None


# Pages and tags


def test_parse_page_shapes_and_errors():
    assert parse_page(DANBOORU, []) == [] and parse_page(MOEBOORU, [{"id": 1}]) == [{"id": 1}]
    assert parse_page(GELBOORU, {"@attributes": {"limit": 100, "offset": 0, "count": 0}}) == []
    assert parse_page(GELBOORU, {"@attributes": {}, "post": {"id": 3}}) == [{"id": 3}]  # one post, given bare
    assert parse_page(GELBOORU, [{"id": 4}]) == [{"id": 4}]  # Gelbooru 0.2 sites answer a bare list
    assert parse_page(DANBOORU, {"posts": [{"id": 2}]}) == [{"id": 2}]
    errors = [
        {"success": False, "error": "PostQuery::TagLimitError", "message": "You cannot search for more than 2 tags"},
        {"success": False, "reason": "access denied"},
        {"message": "Too many requests"},
    ]
    for error in errors:
        with pytest.raises(ValueError, match="answered an error"):
            parse_page(DANBOORU, error)
    with pytest.raises(ValueError, match="not an object with an id"):
        parse_page(MOEBOORU, [{"name": "x"}])
    with pytest.raises(ValueError, match="not a list"):
        parse_page(GELBOORU, "<html>")


@needs_real
def test_parse_tags_maps_types_onto_danbooru_categories():
    konachan = parse_tags(MOEBOORU, load("moebooru/boorusphere_konachan_tags_2023-06.json"))
    assert konachan["book"] == 0 and konachan["melonbooks"] == 3
    assert konachan["suzuno_(bookshelf)"] == 1 and konachan["shirayuki_(girls_book_maker)"] == 4
    gelbooru = parse_tags(GELBOORU, load("gelbooru/boorusphere_gelbooru_tags_2023.json"))
    assert gelbooru["book"] == 0 and gelbooru["artbook"] == 5 and gelbooru["melonbooks"] == 3
    assert gelbooru["bookbag"] == 0  # 6, deprecated
    danbooru = parse_tags(DANBOORU, load("danbooru/boorusphere_danbooru_tags_2023-06.json"))
    assert danbooru["book"] == 0 and danbooru["artbook"] == 5 and danbooru["melonbooks"] == 3


def test_moebooru_extra_types_and_gelbooru_escapes():
    extra = [{"name": n, "type": t} for n, t in (("ideolo", 1), ("circle_x", 5), ("jpeg_artifacts", 6), ("q", 9))]
    assert parse_tags(MOEBOORU, extra) == {"ideolo": 1, "circle_x": 1, "jpeg_artifacts": 5, "q": 0}  # yande.re
    konachan = parse_tags(MOEBOORU, extra, base_url="https://konachan.net")  # 5 style, 6 circle
    assert konachan == {"ideolo": 1, "circle_x": 5, "jpeg_artifacts": 1, "q": 0}
    answer = {
        "@attributes": {"count": 1},
        "tag": [{"name": "&gt;_&lt;", "type": 0}, {"name": "kafuu_chino", "type": 4}],
    }
    assert parse_tags(GELBOORU, answer) == {">_<": 0, "kafuu_chino": 4}
    assert parse_tags(GELBOORU, {"@attributes": {"count": 0}}) == {}
    assert flat_tags(GELBOORU, {"tags": " a &gt;_&lt; rubik&#039;s_cube a "}) == ("a", ">_<", "rubik's_cube")


def test_tag_requests():
    assert tag_requests(DANBOORU, "https://danbooru.donmai.us", ["a", "b"]) == []
    assert tag_requests(GELBOORU, "https://gelbooru.com", []) == []
    assert tag_requests(MOEBOORU, "https://yande.re/", ["a", "b"]) == [("https://yande.re/tag.json", {"limit": "0"})]
    names = [f"t{i}" for i in range(150)] + [">_<", "rubik's_cube", "t0"]
    requests = tag_requests(GELBOORU, "https://gelbooru.com", names, Auth("123", "k"))
    assert [len(p["names"].split()) for _, p in requests] == [100, 52]
    url, params = requests[1]
    assert url == "https://gelbooru.com/index.php"
    assert params["names"].split()[-2:] == ["&gt;_&lt;", "rubik&#039;s_cube"]  # as Gelbooru stores them
    assert params | {"names": ""} == {
        "page": "dapi", "s": "tag", "q": "index", "json": "1", "names": "", "limit": "52",
        "user_id": "123", "api_key": "k",
    }  # fmt: skip


def test_page_requests():
    url, params = page_request(DANBOORU, "https://danbooru.donmai.us/", low=100, below=500, query=" 1girl ")
    assert url == "https://danbooru.donmai.us/posts.json"
    assert params == {"page": "b500", "tags": "id:>=100 1girl", "limit": "200"}
    url, params = page_request(MOEBOORU, "https://yande.re", low=100, below=500, limit=1000, auth=Auth("me", "h"))
    assert url == "https://yande.re/post.json"
    assert params == {"tags": "id:100..499 order:id_desc", "limit": "100", "login": "me", "password_hash": "h"}
    url, params = page_request(GELBOORU, "https://gelbooru.com", low=1, below=10, query="solo", limit=0)
    assert url == "https://gelbooru.com/index.php"
    assert params == {
        "page": "dapi", "s": "post", "q": "index", "json": "1", "pid": "0", "tags": "id:>0 id:<10 sort:id:desc solo",
        "limit": "1",
    }  # fmt: skip
    _, params = page_request(DANBOORU, "https://danbooru.donmai.us", low=1, below=2, auth=Auth("me", "key"))
    assert params["login"] == "me" and params["api_key"] == "key"
    with pytest.raises(ValueError, match="empty id range"):
        page_request(DANBOORU, "https://x", low=5, below=5)


# Credentials


def test_auth_hides_the_key():
    auth = Auth("alice", "s3cret-key")
    assert repr(auth) == "Auth(login='alice', api_key=***)" and "s3cret" not in str(auth)
    assert auth_params(GELBOORU, auth) == {"user_id": "alice", "api_key": "s3cret-key"}
    assert auth_params(MOEBOORU, None) == {}
    assert moebooru_password_hash("pass") == hashlib.sha1(b"choujin-steiner--pass--").hexdigest()


def test_load_auth_sources_in_order(tmp_path):
    env = {ENV_LOGIN: "env-user", ENV_API_KEY: "env-key"}
    assert load_auth("flag-user", "flag-key", env) == Auth("flag-user", "flag-key")
    assert load_auth(None, None, env) == Auth("env-user", "env-key")
    one_line, two_lines = tmp_path / "one", tmp_path / "two"
    one_line.write_text("file-user:file:key\n")
    two_lines.write_text("\nfile-user\n  file-key  \n")
    assert load_auth(None, None, {}, one_line) == Auth("file-user", "file:key")
    assert load_auth(None, None, {}, two_lines) == Auth("file-user", "file-key")
    assert load_auth(None, None, env, one_line) == Auth("env-user", "env-key")
    assert load_auth(None, None, {}) is None


@pytest.mark.parametrize(
    "login, key, env, file_text, message",
    [
        ("me", None, {}, None, "the API key is missing"),
        (None, "k", {}, None, "the login is missing"),
        (None, None, {ENV_LOGIN: "me"}, None, f"{ENV_LOGIN} and {ENV_API_KEY} go together"),
        (None, None, {ENV_API_KEY: "k"}, None, "the login is missing"),
        (None, None, {}, "just-a-login\n", "must hold login:api_key"),
        (None, None, {}, "me:\n", "must hold login:api_key"),
        (None, None, {}, "", "must hold login:api_key"),
    ],
)
def test_load_auth_refuses_half_a_pair(tmp_path, login, key, env, file_text, message):
    key_file = None
    if file_text is not None:
        key_file = tmp_path / "key"
        key_file.write_text(file_text)
    with pytest.raises(UserError, match=message) as info:
        load_auth(login, key, env, key_file)
    assert "\n" not in str(info.value)


def test_load_auth_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read the key file") as info:
        load_auth(None, None, {}, tmp_path / "missing")
    assert "\n" not in str(info.value)
