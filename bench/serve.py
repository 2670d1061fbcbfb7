"""Serving throughput: `i2v serve` with dynamic batching vs one forward pass per request, under concurrent clients.

A randomly initialised 448 px base preset (`i2v_convnext_base` by default) is saved as a bundle, so the forward
pass, not HTTP, dominates. For each mode the real command runs in its own process on loopback; after one warm-up
request, `--clients` clients each post the same image again and again for `--seconds`. Requests answered within
the window count: requests/s, and p50/p99 latency. The modes run one after the other, in alternating rounds
(`--rounds`), so that both see the same machine.

    python -m bench serve [--arch i2v_convnext_base] [--clients 32] [--seconds 30] [--rounds 1] [--device cpu]
"""

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from illust2vec.formats.bundle import Thresholds, save_bundle
from illust2vec.formats.categories import CATEGORY_CODES, RATING_IDS
from illust2vec.formats.vocab import Vocab, tag_id


def save_random_bundle(arch: str, out: Path, tags: int = 512) -> Path:
    """A bundle of a freshly initialised preset (`tags` per head): a real model's cost, no training."""
    import torch

    from illust2vec.models import create_tagger
    from illust2vec.models.tagger import default_heads

    rows = [(RATING_IDS[n], n, CATEGORY_CODES["rating"], 1) for n in RATING_IDS]
    for head in ("general", "character", "copyright"):
        rows += [(tag_id(f"{head}_{i:04d}"), f"{head}_{i:04d}", CATEGORY_CODES[head], 1) for i in range(tags)]
    vocab = Vocab(*(tuple(col) for col in zip(*rows, strict=True)))
    sizes = {h: len(ix) for h, ix in vocab.heads.items()}
    torch.manual_seed(0)
    model = create_tagger(arch, heads=default_heads(sizes)).eval()
    source = {"bench": "random weights"}
    save_bundle(out, model, vocab, Thresholds(method="defaults"), source=source, overwrite=True)
    return out


def sample_image() -> bytes:
    """One JPEG from the synthetic board (about 1,000 px), as a user would upload."""
    from illust2vec.synth.board import Board
    from illust2vec.synth.cast import SynthConfig

    board = Board(SynthConfig(posts=40, seed=3, min_size=900, max_size=1200))
    post = next(p for p in board.posts if p.is_image and p.file_ext == "jpg" and not p.is_deleted and not p.is_banned)
    return board.file(post)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, max_batch: int, max_wait_ms: float, device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "illust2vec.cli", "serve", "--model", str(bundle), "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--backend", "torch"]
    cmd += ["--device", device]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server's stderr, shown if it dies; lives with the server)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            said = log.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"error: the server exited with {proc.returncode}: {' '.join(cmd)}\n{said}")
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: the server did not start within 300 s")


async def load(url: str, image: bytes, clients: int, seconds: float) -> tuple[list[float], float]:
    """`clients` closed-loop clients for `seconds`: latencies of the requests answered within the window."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        start = time.perf_counter()
        end = start + seconds

        async def one_client() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                r = await client.post("/api/tag", files={"file": ("bench.jpg", image, "image/jpeg")})
                r.raise_for_status()
                if time.perf_counter() <= end:
                    latencies.append(time.perf_counter() - t0)

        tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
        await asyncio.sleep(seconds)
        for t in tasks:  # requests still in flight at the end are not counted
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return latencies, seconds


def run_mode(bundle: Path, image: bytes, max_batch: int, args) -> dict:
    proc, url = start_server(bundle, max_batch, args.max_wait_ms, args.device)
    try:
        httpx.post(f"{url}/api/tag", files={"file": ("warm.jpg", image)}, timeout=None).raise_for_status()
        latencies, seconds = asyncio.run(load(url, image, args.clients, args.seconds))
        batching = httpx.get(f"{url}/api/health").json()["batching"]
    finally:
        proc.kill()  # not terminate: a graceful stop would first finish the batch in flight, minutes on a CPU
        proc.wait()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "done": len(latencies),
        "rps": len(latencies) / seconds,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "mean_batch": batching["mean_batch"],
        "largest": batching["largest_batch"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench serve")
    parser.add_argument("--arch", default="i2v_convnext_base", help="a 448 px base preset: the forward pass dominates")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="the window of each mode, per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    image = sample_image()
    modes = {"batched": args.max_batch, "one pass per request": 1}
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = save_random_bundle(args.arch, Path(tmp) / "bundle")
        print(
            f"serve: {args.arch} (random weights), {args.clients} clients, {args.seconds:g} s per mode and round, "
            f"{args.rounds} round(s), {os.cpu_count()} CPUs, device {args.device}, image {len(image) // 1024} KB",
            flush=True,
        )
        for r in range(args.rounds):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))  # alternate who goes first
            for mode in order:
                res = run_mode(bundle, image, modes[mode], args)
                results[mode].append(res)
                print(
                    f"serve: round {r + 1} {mode} (max batch {modes[mode]}): {res['done']} requests, "
                    f"{res['rps']:.3f} requests/s, p50 {res['p50']:.2f} s, p99 {res['p99']:.2f} s, "
                    f"mean batch {res['mean_batch']:.1f}, largest {res['largest']}",
                    flush=True,
                )
    total = {m: sum(x["done"] for x in rs) / (args.seconds * args.rounds) for m, rs in results.items()}
    base = total["one pass per request"]
    ratio = total["batched"] / base if base else float("inf")
    print(
        f"serve: batched {total['batched']:.3f} requests/s vs one pass per request {base:.3f} requests/s: "
        f"{ratio:.2f}x at {args.clients} clients"
    )


if __name__ == "__main__":
    main()
