"""The crawler: posts/s against a plain sequential crawler, images/s against img2dataset, on a slow fakebooru.

Every contender runs against the same board, a separate process (`i2v fakebooru serve --warm`) that renders every
file before it answers, adds 20 ms to every answer and has no rate limit. Ours is `i2v crawl --concurrency 32`
with its rate limits lifted, run as a child process so that its wall clock and CPU seconds (children's rusage) are
its own. Baseline 1 is a plain sequential crawler written below: httpx, one post after another, md5 checked,
written to a tar; no resize on either side. Baseline 2 is img2dataset, installed in bench/.venv-img2dataset (it
pins old webdataset and pandas), with the same resize (longer side 512, never enlarged), 2 processes of 32 threads,
md5 verified as ours does, EXIF left alone as ours leaves it; it gets the board's pictures (800 to 2000 px) twice:
the same URL list as ours (every format), and the JPEG posts alone. A third contender is `i2v crawl --ray`: the same
crawl cut into 4 blocks of ids, run as Ray tasks on a local cluster of this machine's cores that the command starts
and stops itself (its start-up is in its time), 2 blocks at once, each at half the rates and with the same
--concurrency; its ratio to the plain crawl is printed. Each contender runs --repeat times, interleaved, and its
fastest run counts: the machine is shared, and other work only ever slows a run down.

    python -m bench crawl              # full: 1500 posts, 3 runs each, about 4 minutes on 2 cores
    python -m bench crawl --ray-only   # the plain crawl against crawl --ray alone
    python -m bench crawl --quick      # small board, for a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from illust2vec.booru.crawl import SUMMARY_FILE
from illust2vec.booru.sites import IMAGE_EXTS  # what `i2v crawl` downloads

HERE = Path(__file__).resolve().parent
I2D_VENV = HERE / ".venv-img2dataset"


@dataclass(frozen=True)
class Plan:
    """The board and the settings every contender shares."""

    posts: int = 1500  # big enough that our interpreter start-up (~0.4 s) weighs little
    seed: int = 7
    latency: float = 0.02  # seconds added to every answer
    min_size: int = 800  # illustration-sized: shorter side >= 800, longer side <= 2000
    max_size: int = 2000
    concurrency: int = 32
    image_size: int = 512
    processes: int = 2  # img2dataset's processes; 32 threads each


FULL = Plan()
QUICK = Plan(posts=80)


@dataclass
class Run:
    """What one contender did, and what it cost."""

    name: str
    posts: int
    images: int
    wall: float  # seconds, whole process (interpreter start included)
    cpu: float  # user + system seconds of the process and its children
    work: float | None = None  # seconds of the work alone, as the contender itself reports it
    board_cpu: float = 0.0  # CPU seconds the board spent serving this contender

    @property
    def posts_per_s(self) -> float:
        return self.posts / self.wall

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall

    @property
    def cpu_per_image(self) -> float:
        return self.cpu / max(1, self.images)

    def line(self) -> str:
        work = f", {self.images / self.work:.1f} img/s over its own work time" if self.work else ""
        return (
            f"  {self.name}: {self.posts} posts, {self.images} images in {self.wall:.2f} s "
            f"({self.posts_per_s:.1f} posts/s, {self.images_per_s:.1f} img/s{work}); "
            f"{self.cpu:.2f} CPU s ({self.cpu_per_image * 1000:.1f} CPU ms/image); board {self.board_cpu:.2f} CPU s"
        )


# The board


class Board:
    """`i2v fakebooru serve --warm` in its own process, so that it does not share a GIL with anyone measured."""

    def __init__(self, plan: Plan):
        cmd = [sys.executable, "-m", "illust2vec.cli", "fakebooru", "serve", "--warm"]
        cmd += ["--posts", str(plan.posts), "--seed", str(plan.seed), "--latency", str(plan.latency)]
        cmd += ["--min-size", str(plan.min_size), "--max-size", str(plan.max_size)]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise SystemExit(f"the board did not start (exit {self.proc.returncode}): {cmd}")
        self.warm_seconds = time.perf_counter() - t0

    def cpu(self) -> float:
        """CPU seconds the board's process has used so far (Linux: /proc/PID/stat)."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def list_posts(client: httpx.Client, url: str) -> list[dict]:
    """Every post on the board, newest first, paged by id as a crawler pages Danbooru."""
    posts: list[dict] = []
    below = None
    while True:
        params = {"limit": "200", **({"page": f"b{below}"} if below else {})}
        page = client.get(f"{url}/posts.json", params=params).raise_for_status().json()
        posts += page
        if len(page) < 200:
            return posts
        below = min(p["id"] for p in page)


def listen_overflows() -> int | None:
    """Connections the kernel dropped from full listen queues so far (Linux): a slow board, not a slow client."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = [
            line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt")
        ]
        names, values = lines[0], lines[1]
        return int(values[names.index("ListenOverflows")])
    return None


def downloadable(post: dict) -> bool:
    return bool(post.get("file_url") and post.get("md5")) and post.get("file_ext") in IMAGE_EXTS


# The contenders


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command to its end; its wall clock and CPU seconds (its own and its children's)."""
    env = {**os.environ, **(env or {})}
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if code != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {code}); its output is in {log}:\n{log.read_text()[-2000:]}")
    return wall, cpu


def ours(board: Board, plan: Plan, out: Path, image_size: int | None) -> Run:
    """`i2v crawl` at --concurrency 32, rate limits lifted, as its own process."""
    cmd = [sys.executable, "-m", "illust2vec.cli", "crawl", "--url", board.url, "--out", str(out)]
    cmd += ["--concurrency", str(plan.concurrency), "--api-rate", "1000", "--file-rate", "1000"]
    cmd += ["--image-size", str(image_size or "original")]
    board0 = board.cpu()
    wall, cpu = run_child(cmd, out.with_suffix(".log"))
    summary = json.loads((out / SUMMARY_FILE).read_text())
    if summary["statuses"].get("failed"):
        raise SystemExit(f"our crawl failed {summary['statuses']['failed']} posts: {summary['failures'][:3]}")
    name = f"ours (i2v crawl --concurrency {plan.concurrency}, {'original' if image_size is None else image_size})"
    return Run(name, summary["listed"], summary["images"], wall, cpu, summary["seconds"], board.cpu() - board0)


def ours_ray(board: Board, plan: Plan, out: Path, top_id: int) -> Run:
    """`i2v crawl --ray`: the same crawl in 4 blocks of ids, 2 at a time, on a local Ray cluster it starts itself."""
    cmd = [sys.executable, "-m", "illust2vec.cli", "crawl", "--url", board.url, "--out", str(out)]
    cmd += ["--concurrency", str(plan.concurrency), "--api-rate", "1000", "--file-rate", "1000"]
    cmd += ["--ray", "--ray-tasks", "2", "--block-size", str(top_id // 4 + 1)]
    board0 = board.cpu()
    env = {"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}  # its own local cluster, no telemetry
    wall, cpu = run_child(cmd, out.with_suffix(".log"), env)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    if summary["statuses"].get("failed"):
        raise SystemExit(f"crawl --ray failed {summary['statuses']['failed']} posts: {summary['failures'][:3]}")
    name = f"ours (i2v crawl --ray, {summary['blocks']['total']} blocks, 2 at once, original)"
    # Ray's workers are not children of the command (the raylet starts them): their CPU is not in `cpu`.
    work = summary["seconds"] - summary["cluster_seconds"]  # its work once the cluster is up
    return Run(name, summary["listed"], summary["images"], wall, cpu, work, board.cpu() - board0)


def sequential(board: Board, out: Path) -> Run:
    """A plain crawler: one post after another, file fetched, md5 checked, written to a tar with its json."""
    board0, cpu0, t0 = board.cpu(), time.process_time(), time.perf_counter()
    posts = images = 0
    with httpx.Client(timeout=60) as client, tarfile.open(out, "w") as tar:
        below = None
        while True:
            params = {"limit": "200", **({"page": f"b{below}"} if below else {})}
            page = client.get(f"{board.url}/posts.json", params=params).raise_for_status().json()
            for post in page:
                posts += 1
                if not downloadable(post):
                    continue
                data = client.get(post["file_url"]).raise_for_status().content
                if hashlib.md5(data).hexdigest() != post["md5"]:
                    raise SystemExit(f"sequential: md5 mismatch on post {post['id']}")
                for name, blob in ((f"{post['md5']}.{post['file_ext']}", data), (f"{post['md5']}.json", post)):
                    if isinstance(blob, dict):
                        blob = json.dumps(blob).encode()
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                images += 1
            if len(page) < 200:
                break
            below = min(p["id"] for p in page)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Run("sequential (httpx, one post at a time, original)", posts, images, wall, cpu, None, board.cpu() - board0)


def img2dataset_command() -> Path | None:
    exe = I2D_VENV / "bin" / "img2dataset"
    return exe if exe.exists() else None


def install_img2dataset() -> str | None:
    """Create bench/.venv-img2dataset with img2dataset in it; None on success, else why it failed."""
    print(f"crawl: installing img2dataset into {I2D_VENV} (once; it pins old webdataset and pandas)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True, capture_output=True, text=True)
        pip = [str(I2D_VENV / "bin" / "pip"), "install", "--quiet", "img2dataset"]
        subprocess.run(pip, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return detail.strip().splitlines()[-1] if detail.strip() else str(e)
    return None


def img2dataset(board: Board, plan: Plan, posts: list[dict], what: str, out: Path) -> Run:
    """img2dataset on the posts' file URLs, longer side resized to 512, md5 verified against the board's."""
    out.mkdir(parents=True)
    url_list = out / "urls.parquet"
    pq.write_table(pa.table({"url": [p["file_url"] for p in posts], "md5": [p["md5"] for p in posts]}), url_list)
    shards = out / "shards"
    per_shard = math.ceil(len(posts) / (2 * plan.processes))  # two shards per process, so both work to the end
    cmd = [str(img2dataset_command()), "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url"]
    cmd += ["--output_folder", str(shards), "--output_format", "webdataset"]
    cmd += ["--image_size", str(plan.image_size), "--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger"]
    cmd += ["True", "--encode_format", "jpg", "--encode_quality", "95"]
    cmd += ["--processes_count", str(plan.processes), "--thread_count", str(plan.concurrency)]
    cmd += ["--number_sample_per_shard", str(per_shard), "--compute_hash", "md5", "--verify_hash", '["md5","md5"]']
    # EXIF extraction is on by default in img2dataset; ours does not do it, so neither does it here.
    cmd += ["--extract_exif", "False", "--timeout", "60", "--retries", "0", "--enable_wandb", "False"]
    cmd += ["--disallowed_header_directives", "[]"]
    board0 = board.cpu()
    # NO_ALBUMENTATIONS_UPDATE: albumentations would otherwise ask PyPI for a newer version at import.
    wall, cpu = run_child(cmd, out / "img2dataset.log", {"NO_ALBUMENTATIONS_UPDATE": "1"})
    stats = [json.loads(Path(f).read_text()) for f in glob.glob(str(shards / "*_stats.json"))]
    images = sum(s["successes"] for s in stats)
    failed = sum(s["count"] - s["successes"] for s in stats)
    if failed:
        raise SystemExit(f"img2dataset failed {failed} of {len(posts)} images; see {out / 'img2dataset.log'}")
    work = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    name = f"img2dataset ({plan.processes} processes x {plan.concurrency} threads, 512, {what})"
    return Run(name, len(posts), images, wall, cpu, work, board.cpu() - board0)


# The report


def ratio(name: str, unit: str, ours_value: float, theirs_value: float, theirs: str) -> str:
    return (
        f"{name}: ours {ours_value:.1f} {unit} vs {theirs} {theirs_value:.1f} {unit}: {ours_value / theirs_value:.2f}x"
    )


def best(runs: list[Run]) -> Run:
    """The fastest of the repeats: other work on the machine only ever slows a run down."""
    return min(runs, key=lambda r: r.wall)


def img2dataset_skip(args: argparse.Namespace) -> str | None:
    """Why the img2dataset comparison cannot run, installing it first where allowed; None when it can."""
    if args.no_img2dataset:
        return "--no-img2dataset"
    if img2dataset_command() is not None:
        return None
    if args.quick and not args.install:
        return f"not installed in {I2D_VENV}; run with --install, or the full benchmark, to install it"
    why = install_img2dataset()
    if why is None and img2dataset_command() is None:
        why = "pip installed no img2dataset command"
    return None if why is None else f"could not install it: {why}"


def report_ray(runs: dict[str, list[Run]]) -> None:
    plain, ray = best(runs["ours-original"]), best(runs["ours-ray"])
    print(
        ratio("crawl --ray", "posts/s", ray.posts_per_s, plain.posts_per_s, "plain crawl")
        + " (whole commands, Ray's start included)"
    )
    print(
        ratio("crawl --ray, work time only", "posts/s", ray.posts / ray.work, plain.posts / plain.work, "plain crawl")
        + " (--ray: from the cluster up to the end; plain: the crawl's own time)"
    )


def report(runs: dict[str, list[Run]]) -> None:
    print(f"best of {len(runs['ours-original'])} runs each:")
    for runs_of_one in runs.values():
        if runs_of_one:
            print(best(runs_of_one).line())
    if runs["ours-ray"]:
        report_ray(runs)
    if not runs["sequential"]:
        return
    seq, orig, resized = best(runs["sequential"]), best(runs["ours-original"]), best(runs["ours-512"])
    print(
        ratio("crawl", "posts/s", orig.posts_per_s, seq.posts_per_s, "sequential")
        + f" (target >= 10x; CPU s/image: ours {orig.cpu_per_image:.4f}, sequential {seq.cpu_per_image:.4f})"
    )
    if orig.work:
        print(
            ratio("crawl, work time only", "posts/s", orig.posts / orig.work, seq.posts_per_s, "sequential")
            + " (our interpreter start-up left out; the sequential crawler runs inside this process)"
        )
    notes = {
        "img2dataset-all": "the same URL list on both sides: every image post, all formats",
        "img2dataset-jpg": "ours: every image post, all formats; img2dataset: the JPEG posts alone",
    }
    for key, note in notes.items():
        if not runs[key]:
            continue
        theirs = best(runs[key])
        label = f"img2dataset ({key.split('-')[1]})"
        print(
            ratio(label, "img/s", resized.images_per_s, theirs.images_per_s, "img2dataset")
            + f" (target >= 1x; {note}; both verify md5, resize the longer side to 512 and write tar shards)"
        )
        if resized.work and theirs.work:
            ours_rate, their_rate = resized.images / resized.work, theirs.images / theirs.work
            print(
                ratio(f"{label}, work time only", "img/s", ours_rate, their_rate, "img2dataset")
                + " (interpreter start-up and shut-down left out)"
            )
        print(
            f"{label}: CPU s/image (download + verify + resize + write, process start included): ours "
            f"{resized.cpu_per_image:.4f} vs img2dataset {theirs.cpu_per_image:.4f}: "
            f"{theirs.cpu_per_image / resized.cpu_per_image:.2f}x less CPU per image for ours"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench crawl", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small board, one run each (smoke test)")
    parser.add_argument("--posts", type=int, help="posts on the board (default: 1500, or 80 with --quick)")
    parser.add_argument("--repeat", type=int, help="runs of each contender, the best kept (default: 3, 1 quick)")
    parser.add_argument("--no-img2dataset", action="store_true", help="skip the img2dataset comparison")
    parser.add_argument("--install", action="store_true", help="with --quick: install img2dataset if missing")
    parser.add_argument("--no-ray", action="store_true", help="skip the crawl --ray comparison")
    parser.add_argument("--ray-only", action="store_true", help="the plain crawl against crawl --ray alone")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.posts:
        plan = Plan(**{**plan.__dict__, "posts": args.posts})
    repeat = args.repeat or (1 if args.quick else 3)

    board = Board(plan)
    try:
        with httpx.Client(timeout=60) as client:
            listed = list_posts(client, board.url)
        files = [p for p in listed if downloadable(p)]
        jpgs = [p for p in files if p["file_ext"] in ("jpg", "jpeg")]
        sizes = [max(p["image_width"], p["image_height"]) for p in files]
        print(
            f"crawl: board of {len(listed)} posts ({len(files)} images, {len(jpgs)} JPEG; {min(sizes)} to "
            f"{max(sizes)} px on the longer side), {plan.latency * 1000:.0f} ms per answer, no rate limit, "
            f"rendered in {board.warm_seconds:.1f} s; {os.cpu_count()} cores shared with the board; "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        skip = "--ray-only" if args.ray_only else img2dataset_skip(args)
        if skip is not None:
            print(f"img2dataset: skipped ({skip})", flush=True)
        overflows0 = listen_overflows()
        names = ("sequential", "ours-original", "ours-512", "ours-ray", "img2dataset-all", "img2dataset-jpg")
        runs: dict[str, list[Run]] = {name: [] for name in names}
        with tempfile.TemporaryDirectory(prefix="bench-crawl-") as tmp:
            for i in range(repeat):
                where = Path(tmp) / str(i)
                where.mkdir()
                if not args.ray_only:
                    runs["sequential"].append(sequential(board, where / "sequential.tar"))
                runs["ours-original"].append(ours(board, plan, where / "ours-original", None))
                if not args.no_ray:
                    runs["ours-ray"].append(ours_ray(board, plan, where / "ours-ray", max(p["id"] for p in listed)))
                if not args.ray_only:
                    runs["ours-512"].append(ours(board, plan, where / "ours-512", plan.image_size))
                if skip is None:
                    runs["img2dataset-all"].append(img2dataset(board, plan, files, "all", where / "i2d-all"))
                    runs["img2dataset-jpg"].append(img2dataset(board, plan, jpgs, "JPEG", where / "i2d-jpg"))
                print(f"run {i + 1}/{repeat} done; load average {os.getloadavg()[0]:.2f}", flush=True)
        report(runs)
        overflows = listen_overflows()
        if overflows is not None and overflows0 is not None and overflows > overflows0:
            print(
                f"warning: {overflows - overflows0} connections overflowed a listen queue during the runs: "
                "some client waited on the board's accept queue, not on its own work"
            )
    finally:
        board.close()


if __name__ == "__main__":
    main()
