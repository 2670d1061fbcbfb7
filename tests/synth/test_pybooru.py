"""A third-party Danbooru client, written for the real site, pages through the fake board."""

from __future__ import annotations

import pytest

from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board

pybooru = pytest.importorskip("pybooru")


@pytest.fixture(scope="module")
def server():
    with start_board(SynthConfig(posts=120, seed=11, min_size=64, max_size=400)) as s:
        yield s


def test_pybooru_sees_every_post_once(server):
    client = pybooru.Danbooru(site_url=server.url)
    seen: list[int] = []
    page = client.post_list(limit=25)
    while page:
        seen += [post["id"] for post in page]
        page = client.post_list(limit=25, page=f"b{page[-1]['id']}")
    assert seen == [p.id for p in reversed(server.board.posts)]


def test_pybooru_show_and_errors(server):
    client = pybooru.Danbooru(site_url=server.url)
    post = server.board.posts[7]
    assert client.post_show(post.id)["id"] == post.id
    assert len(client.post_list(tags="order:id", limit=3, page=2)) == 3
    missing = server.board.posts[-1].id + 1
    with pytest.raises(pybooru.PybooruHTTPError):
        client.post_show(missing)
    assert client.last_call["status_code"] == 404
    # pybooru 4.2.2 has no text for 410 and fails with KeyError while building its error, on the real site too.
    with pytest.raises((pybooru.PybooruHTTPError, KeyError)):
        client.post_list(page=1001)
    assert client.last_call["status_code"] == 410
