"""The synthetic board: first-page latency on a big board, and files served over HTTP vs read in-process.

Baseline: the same files rendered by `Board.file` in this process, with no HTTP. The ratio says what the
server's HTTP layer costs on top of rendering.
"""

import time

import httpx

from illust2vec.synth.board import Board
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board


def main(posts: int = 2000, files: int = 60) -> None:
    cfg = SynthConfig(posts=posts, seed=11)
    t0 = time.perf_counter()
    with start_board(cfg) as server, httpx.Client(timeout=60) as client:
        page = client.get(f"{server.url}/posts.json").raise_for_status().json()
        first_page = time.perf_counter() - t0
        big = client.get(f"{server.url}/posts.json", params={"limit": files}).raise_for_status().json()
        urls = [p["file_url"] for p in big if "file_url" in p]
        t1 = time.perf_counter()
        served = sum(len(client.get(u).raise_for_status().content) for u in urls)
        http_s = time.perf_counter() - t1

    board = Board(cfg)
    ids = {p["id"] for p in big if "file_url" in p}
    t2 = time.perf_counter()
    direct = sum(len(board.file(p)) for p in board.posts if p.id in ids)
    direct_s = time.perf_counter() - t2
    assert direct == served, "HTTP and in-process bytes differ"

    print(f"fakebooru: first page of {len(page)} posts on a {posts}-post board: {first_page:.2f} s after start")
    print(f"fakebooru: {len(urls)} files ({served / 1e6:.1f} MB) over HTTP (cached after listing): {http_s:.2f} s")
    print(f"fakebooru: the same files rendered in-process (baseline, uncached): {direct_s:.2f} s")
    print(f"fakebooru: ratio HTTP-from-cache / render-in-process = {http_s / direct_s:.2f}")


if __name__ == "__main__":
    main()
