"""The fake board through Moebooru's and Gelbooru's APIs, read back with the crawler's site tables."""

from __future__ import annotations

import re

import httpx
import pytest

from illust2vec.booru.sites import SITES, page_request, parse_page, parse_tags, tag_requests, to_post
from illust2vec.formats.categories import POST_CATEGORIES
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board

# Every kind of post (deleted, banned, non-image, child, with and without a sample) on a small board.
CONFIG = SynthConfig(
    posts=120,
    seed=7,
    deleted_fraction=0.08,
    banned_fraction=0.05,
    non_image_fraction=0.05,
    child_fraction=0.1,
    min_size=64,
    max_size=1000,
)
DAPI = {"page": "dapi", "q": "index", "json": "1"}


@pytest.fixture(scope="module")
def server():
    with start_board(CONFIG) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def get(client: httpx.Client, path: str, **params):
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def moebooru_ids(client: httpx.Client, **params) -> list[int]:
    return [p["id"] for p in get(client, "/post.json", **params)]


def gelbooru_ids(client: httpx.Client, **params) -> list[int]:
    return [p["id"] for p in get(client, "/index.php", s="post", **DAPI, **params).get("post", [])]


def hidden(post) -> bool:
    return post.is_deleted or post.is_banned


def categories_of(client: httpx.Client, site_name: str, server) -> dict[str, int]:
    """Every tag's category, asked for as the crawler asks: through tag_requests and parse_tags."""
    site, names = SITES[site_name], [t.name for t in server.tags]
    found: dict[str, int] = {}
    for url, params in tag_requests(site, server.url, names):
        found.update(parse_tags(site, get(client, url.removeprefix(server.url), **params)))
    return found


def check_against_board(server, post, site_name: str) -> None:
    """A parsed post says what the board knows about it: file, rating, time, tags by category, parent."""
    truth = server.board.get(post.id)
    assert truth is not None and post.site == site_name
    if hidden(truth):
        assert post.md5 is None and not post.has_file
    else:
        assert post.md5 == server.board.md5(truth) and post.has_file
        assert post.file_url.endswith(f"/original/{post.md5[:2]}/{post.md5[2:4]}/{post.md5}.{truth.file_ext}")
    assert post.file_ext == truth.file_ext and post.is_image == truth.is_image
    assert (post.width, post.height, post.score, post.parent_id) == (
        truth.width,
        truth.height,
        truth.score,
        truth.parent_id,
    )
    # Moebooru has one safe rating for the board's general and sensitive; Gelbooru split them as Danbooru did.
    assert post.rating == ("g" if site_name == "moebooru" and truth.rating in "gs" else truth.rating)
    assert post.created_at == truth.created_at.replace(microsecond=0)
    for category in POST_CATEGORIES:
        assert sorted(getattr(post, f"tags_{category}")) == sorted(truth.tags.get(category, ())), category
    assert post.source == truth.source


# Moebooru


def test_moebooru_posts_are_the_boards(server, client):
    site = SITES["moebooru"]
    categories = categories_of(client, "moebooru", server)
    assert categories == {t.name: t.category for t in server.tags}
    raws = []
    for page in (1, 2):
        raws += parse_page(site, get(client, "/post.json", tags="deleted:all", limit=100, page=page))
    assert [r["id"] for r in raws] == [p.id for p in reversed(server.board.posts)]
    for raw in raws:
        check_against_board(server, to_post(site, raw, categories), "moebooru")
        truth = server.board.get(raw["id"])
        assert raw["status"] == ("deleted" if hidden(truth) else "active")
        assert ("file_url" in raw) != hidden(truth) and len(raw["md5"]) == 32  # Moebooru keeps a deleted md5
        assert raw["rating"] in ("s", "q", "e") and isinstance(raw["created_at"], int)
        if not hidden(truth):  # no sample: the sample is the original, as on Moebooru
            assert ("/sample/" in raw["sample_url"]) == server.board.has_large(truth)


def test_moebooru_searches(server, client):
    posts = server.board.posts
    visible = [p.id for p in posts if not hidden(p)]
    assert sorted(moebooru_ids(client, limit=100) + moebooru_ids(client, limit=100, page=2)) == visible
    assert sorted(moebooru_ids(client, tags="deleted:true", limit=100)) == [p.id for p in posts if hidden(p)]
    assert moebooru_ids(client, tags="order:id", limit=5) == visible[:5]
    assert moebooru_ids(client, tags="order:id_desc", limit=5) == visible[::-1][:5]
    assert moebooru_ids(client, tags=f"id:{visible[3]}..{visible[9]} order:id") == visible[3:10]
    assert len(moebooru_ids(client)) == 40 and len(moebooru_ids(client, limit=1000)) == 100
    safe = sorted(moebooru_ids(client, tags="rating:s", limit=100))
    assert safe == [p.id for p in posts if not hidden(p) and p.rating in "gs"]
    assert moebooru_ids(client, tags="a b c d e f") == []  # six plain tags are allowed, seven are not
    response = client.get("/post.json", params={"tags": "a b c d e f g"})
    assert response.status_code == 422 and "more than 6 tags" in response.json()["message"]


def test_moebooru_tags(server, client):
    tags = get(client, "/tag.json")
    assert len(tags) == 50 and set(tags[0]) == {"id", "name", "count", "type", "ambiguous"}
    assert [t["name"] for t in tags] == sorted(t.name for t in server.tags)[:50]  # by name unless asked
    every = get(client, "/tag.json", limit=0)
    assert len(every) == len(server.tags)
    by_name = {t["name"]: t for t in every}
    for tag in server.tags:
        assert by_name[tag.name]["count"] == tag.post_count
        assert by_name[tag.name]["type"] == {5: 6}.get(tag.category, tag.category)  # meta -> yande.re's faults
    hair = [t["name"] for t in get(client, "/tag.json", name="hair", limit=0)]
    assert hair and all("hair" in n for n in hair)  # a substring, as Moebooru matches
    assert [t["name"] for t in get(client, "/tag.json", name="*_hair", limit=0)] == [
        n for n in hair if n.endswith("_hair")
    ]
    counts = [t["count"] for t in get(client, "/tag.json", order="count", limit=10)]
    assert counts == sorted(counts, reverse=True)
    assert {t["type"] for t in get(client, "/tag.json", type=4, limit=0)} == {4}


# Gelbooru


def test_gelbooru_posts_are_the_boards(server, client):
    site = SITES["gelbooru"]
    categories = categories_of(client, "gelbooru", server)
    assert categories == {t.name: t.category for t in server.tags}
    answer = get(client, "/index.php", s="post", **DAPI, limit=100)
    visible = [p for p in server.board.posts if not hidden(p)]
    assert answer["@attributes"] == {"limit": 100, "offset": 0, "count": len(visible)}
    raws = parse_page(site, answer) + parse_page(site, get(client, "/index.php", s="post", **DAPI, limit=100, pid=1))
    assert [r["id"] for r in raws] == [p.id for p in reversed(visible)]  # deleted and banned posts are gone
    for raw in raws:
        check_against_board(server, to_post(site, raw, categories), "gelbooru")
        assert re.fullmatch(r"\w{3} \w{3} \d\d \d\d:\d\d:\d\d -0[56]00 \d{4}", raw["created_at"])
        assert raw["has_children"] in ("true", "false") and isinstance(raw["parent_id"], int)
        assert raw["image"] == f"{raw['md5']}.{raw['file_url'].rsplit('.', 1)[1]}"


def test_gelbooru_searches_and_empty_answers(server, client):
    visible = [p.id for p in server.board.posts if not hidden(p)]
    assert gelbooru_ids(client, tags="sort:id:asc", limit=5) == visible[:5]
    assert gelbooru_ids(client, tags="sort:id:desc", limit=5, pid=1) == visible[::-1][5:10]
    assert gelbooru_ids(client, tags=f"id:>{visible[3]} id:<{visible[9]} sort:id:asc") == visible[4:9]
    assert len(gelbooru_ids(client, limit=1000)) == 100
    general = sorted(gelbooru_ids(client, tags="rating:general", limit=100))
    assert general == [p.id for p in server.board.posts if not hidden(p) and p.rating == "g"]
    empty = get(client, "/index.php", s="post", **DAPI, tags="id:<0")
    assert empty == {"@attributes": {"limit": 100, "offset": 0, "count": 0}}  # no "post" key at all
    assert parse_page(SITES["gelbooru"], empty) == []
    xml = client.get("/index.php", params={"page": "dapi", "s": "post", "q": "index"})
    assert xml.status_code == 422 and "json=1" in xml.json()["message"]


def test_gelbooru_tags(server, client):
    names = [t.name for t in server.tags[:3]]
    answer = get(client, "/index.php", s="tag", **DAPI, names=" ".join(names))
    assert sorted(t["name"] for t in answer["tag"]) == sorted(names)
    assert answer["@attributes"]["count"] == 3 and set(answer["tag"][0]) == {"id", "name", "count", "type", "ambiguous"}
    pattern = [t["name"] for t in get(client, "/index.php", s="tag", **DAPI, name_pattern="%_hair", limit=1000)["tag"]]
    assert pattern == sorted(t.name for t in server.tags if t.name.endswith("_hair"))
    assert "tag" not in get(client, "/index.php", s="tag", **DAPI, names="no_such_tag")


# Walking id ranges, as the crawler does


@pytest.mark.parametrize(
    "site_name, query, every",
    [("danbooru", "", True), ("moebooru", "", False), ("moebooru", "deleted:all", True), ("gelbooru", "", False)],
)
def test_id_range_walk_sees_every_post_once(server, client, site_name, query, every):
    site = SITES[site_name]
    categories = categories_of(client, site_name, server) if site.flat_tags else None
    posts = server.board.posts
    top = posts[-1].id + 1
    seen = []
    for low, high in ((1, posts[50].id), (posts[50].id, top)):  # two shards of the id space
        below = high
        while below > low:
            url, params = page_request(site, server.url, low=low, below=below, query=query, limit=7)
            page = [to_post(site, raw, categories) for raw in parse_page(site, get(client, url, **params))]
            if not page:
                break
            assert [p.id for p in page] == sorted((p.id for p in page), reverse=True)
            assert all(low <= p.id < below for p in page) and len(page) <= 7
            seen += page
            below = page[-1].id
    expected = [p.id for p in posts if every or not hidden(p)]
    assert sorted(p.id for p in seen) == expected and len(seen) == len(expected)
    for post in seen:
        check_against_board(server, post, site_name)
