"""The `i2v` command line: parse arguments, call one library function, print.

Machine-readable output goes to stdout alone; progress, logs and summaries go to stderr. A user's
mistake is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from .errors import UserError

try:  # recent typer vendors click; its exceptions are the ones raised
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer on top of click
    from click import exceptions as click_exceptions

app = typer.Typer(
    help="illust2vec: crawl a board, train a tagger, tag, embed and search anime-style illustrations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
fakebooru = typer.Typer(
    help="A synthetic Danbooru-compatible board for offline tests and the demo.", no_args_is_help=True
)
app.add_typer(fakebooru, name="fakebooru")
err = Console(stderr=True)


# ---- options several commands share: one definition each (typer reads a fresh OptionInfo per parameter)


def device_option(note: str = "") -> Any:
    return typer.Option("auto", help=f"auto (cuda when present), cpu or cuda[:N]{note}.")


def backend_option(note: str = "") -> Any:
    return typer.Option("auto", help=f"auto (ONNX on the CPU when the bundle has it), torch or onnx{note}.")


def precision_option() -> Any:
    return typer.Option(
        "auto", help="auto (model.int8.onnx from i2v quantize on the CPU when it exists, else fp32), fp32 or int8."
    )


def shard_option(what: str) -> Any:
    return typer.Option("0/1", help=f"Take part I of N of the {what} (0 <= I < N), for job arrays.")


def workers_option(help: str, default: int | None = None, minimum: int = 1) -> Any:
    return typer.Option(default, min=minimum, help=help)


def ray_address_option() -> Any:
    return typer.Option(None, help="--ray's cluster: auto or ray://host:10001 (default: RAY_ADDRESS, else local).")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages to stderr.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # the object store libraries tell at INFO where they found credentials: noise, on every command
        for name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "fsspec", "google"):
            logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    print(__version__)


@fakebooru.command("serve")
def fakebooru_serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(0, help="Port; 0 picks a free one."),
    posts: int = typer.Option(2000, min=1, help="Number of posts on the board."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same board, byte for byte."),
    characters: int = typer.Option(40, min=0, help="Size of the cast."),
    series: int = typer.Option(8, min=1, help="Number of series (copyrights)."),
    label_noise: float = typer.Option(0.03, min=0.0, max=1.0, help="Chance that a true general tag is missing."),
    error_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Fault: fraction of answers that are a 5xx."),
    truncate_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Fault: fraction of bodies cut short."),
    html_rate: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Fault: fraction of API answers that are an HTML challenge page, status 200."
    ),
    cut_json_rate: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Fault: fraction of API answers whose JSON is cut short (a clean end)."
    ),
    bad_md5_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Fault: fraction of files not matching md5."),
    rate_limit: int = typer.Option(0, min=0, help="Fault: requests per second before 429 (0: no limit)."),
    latency: float = typer.Option(0.0, min=0.0, help="Fault: seconds added to every answer."),
    fault_seed: int = typer.Option(0, help="Seed of the faults: which requests they fire on."),
    min_size: int = typer.Option(300, min=16, help="Shorter side of a picture at least, in pixels."),
    max_size: int = typer.Option(2000, min=16, help="Longer side of a picture at most, in pixels."),
    warm: bool = typer.Option(False, help="Render every file before printing the URL (for benchmarks)."),
) -> None:
    """Serve the synthetic board; prints its URL as the first line on stdout once it listens."""
    from .synth.cast import SynthConfig
    from .synth.faults import Faults
    from .synth.server import serve_board

    cfg = SynthConfig(
        posts=posts,
        seed=seed,
        characters=characters,
        series=series,
        label_noise=label_noise,
        min_size=min_size,
        max_size=max_size,
    )
    faults = Faults(
        error_rate=error_rate,
        truncate_rate=truncate_rate,
        html_rate=html_rate,
        cut_json_rate=cut_json_rate,
        bad_md5_rate=bad_md5_rate,
        rate_limit=rate_limit,
        slow_rate=1.0 if latency > 0 else 0.0,
        slow_seconds=latency,
        seed=fault_seed,
    )
    serve_board(cfg, host=host, port=port, faults=faults, warm=warm)


@app.command()
def crawl(
    url: str = typer.Option(..., help="The board's address, e.g. https://danbooru.donmai.us."),
    out: str = typer.Option(..., help="Crawl directory or URL (s3://, gs://, file://): posts/*.parquet, images/*.tar."),
    site: str = typer.Option("danbooru", help="danbooru, moebooru (yande.re, konachan) or gelbooru."),
    tags: str = typer.Option("", help="Search query that every post must match (the board's syntax)."),
    ids: str = typer.Option(None, help="Only posts with ids A..B (both ends included)."),
    shard: str = shard_option("id range"),
    limit: int = typer.Option(None, min=1, help="List at most this many posts (newest first)."),
    concurrency: int = typer.Option(16, min=1, help="Downloads in flight."),
    api_rate: float = typer.Option(None, min=0.01, help="API requests per second (default: the site's)."),
    file_rate: float = typer.Option(None, min=0.01, help="File requests per second (default: the site's)."),
    image_size: str = typer.Option("original", help="Longer side to resize to while downloading, or 'original'."),
    keep_non_images: bool = typer.Option(False, help="Store zip, mp4 and other non-image files as they are."),
    shard_size: int = typer.Option(1000, min=1, help="Images per tar shard."),
    login: str = typer.Option(None, help="Account name (or I2V_LOGIN, or --key-file)."),
    api_key: str = typer.Option(None, help="API key; prefer I2V_API_KEY or --key-file: a flag shows in `ps`."),
    key_file: Path = typer.Option(None, help="File holding login:api_key on its first line."),
    user_agent: str = typer.Option(None, help="User-Agent header (default: illust2vec's own)."),
    dry_run: bool = typer.Option(False, help="List the posts and count them; download and write nothing."),
    state_dir: Path = typer.Option(
        None, help="Local resume state (default: OUT itself when local, else a cache folder named after the URL)."
    ),
    ray: bool = typer.Option(False, "--ray", help="Crawl blocks of ids as tasks on a Ray cluster."),
    ray_address: str = typer.Option(
        None, help="Ray cluster: auto or ray://host:10001 (default: RAY_ADDRESS, else a local one)."
    ),
    block_size: int = typer.Option(100_000, min=1, help="With --ray: ids per block."),
    ray_tasks: int = typer.Option(None, min=1, help="With --ray: blocks crawled at once (default: one per CPU)."),
) -> None:
    """Crawl a board: posts to Parquet, images verified and written to tar shards; resumable."""
    from .booru.crawl import CrawlConfig, print_summary
    from .booru.crawl import crawl as run_crawl
    from .booru.sites import load_auth

    cfg = CrawlConfig(
        url=url,
        out=out,
        site=site,
        tags=tags,
        ids=ids,
        shard=shard,
        limit=limit,
        concurrency=concurrency,
        api_rate=api_rate,
        file_rate=file_rate,
        image_size=image_size,
        user_agent=user_agent,
        keep_non_images=keep_non_images,
        shard_size=shard_size,
        dry_run=dry_run,
        state_dir=state_dir,
        ray=ray or ray_address is not None,
        ray_address=ray_address,
        block_size=block_size,
        ray_tasks=ray_tasks,
    )
    auth = load_auth(login, api_key, key_file=key_file)
    result = run_crawl(cfg, auth, console=err)
    if dry_run:
        print(json.dumps(result.as_dict()))
        return
    print_summary(result, err)
    if result.failed:
        raise typer.Exit(1)


@app.command("export-csv")
def export_csv(
    dirs: list[str] = typer.Argument(..., help="Crawl directories or URLs (s3://, gs://, https://)."),
    out: str = typer.Option(None, help="CSV file or URL to write (default: stdout)."),
) -> None:
    """Write the crawled posts as the seed's tags.csv: id, md5, rating, tags per category."""
    import io

    from .formats.posts import export_csv as write_csv
    from .util import storage

    crawls = [storage.location(d, "crawl") for d in dirs]
    if out is None:
        rows = write_csv(crawls)
    else:
        dest = storage.location(out, "--out", write=True)
        text = io.StringIO(newline="")
        rows = write_csv(crawls, text)
        storage.write_text(dest, text.getvalue())  # whole or absent
    err.print(f"{rows} posts written")


@app.command()
def vocab(
    dirs: list[str] = typer.Argument(..., help="Crawl directories or URLs (s3://bucket/crawl, gs://, https://)."),
    out: str = typer.Option("selected_tags.csv", help="File or URL to write (WD's selected_tags.csv columns)."),
    top: int = typer.Option(512, min=0, help="Most frequent tags to keep per category (the seed's 512)."),
    top_general: int = typer.Option(None, min=0, help="General tags to keep (default: --top)."),
    top_character: int = typer.Option(None, min=0, help="Character tags to keep (default: --top)."),
    top_copyright: int = typer.Option(None, min=0, help="Copyright tags to keep (default: --top)."),
    top_artist: int = typer.Option(None, min=0, help="Artist tags to keep, with --artist (default: --top)."),
    min_count: int = typer.Option(1, min=1, help="Leave out tags on fewer posts than this."),
    artist: bool = typer.Option(False, help="Give artists a head too (left out by default, as WD does)."),
    aliases: str = typer.Option(None, help="CSV of tag renames old,new (or Danbooru's tag_aliases); a path or URL."),
) -> None:
    """Choose the tag vocabulary: the most frequent tags of each category in the crawled posts, as selected_tags.csv."""
    from .data.vocab import VocabConfig, build_vocab
    from .formats.vocab import read_aliases, write_vocab
    from .util import storage

    out = storage.location(out, "--out", write=True)
    storage.check_writable_root(out)  # a missing bucket is named before the posts are read

    given = {"general": top_general, "character": top_character, "copyright": top_copyright, "artist": top_artist}
    cfg = VocabConfig(
        top={c: n for c, n in given.items() if n is not None},
        default_top=top,
        min_count=min_count,
        artist=artist,
        aliases=read_aliases(aliases) if aliases else None,
    )
    result = build_vocab(dirs, cfg)
    write_vocab(result, out)
    for head, rows in result.heads.items():
        counts = [result.counts[i] for i in rows]
        err.print(f"{head}: {len(rows)} tags, on {max(counts)} down to {min(counts)} posts each", highlight=False)
    err.print(f"{storage.display(out)}: {len(result)} tags, vocabulary hash {result.hash[:12]}", highlight=False)


@app.command("build")
def build_shards(
    dirs: list[str] = typer.Argument(..., help="Crawl directories or URLs (s3://bucket/crawl, gs://, https://)."),
    vocab: str = typer.Option(..., help="selected_tags.csv from `i2v vocab` (a path or URL)."),
    out: str = typer.Option(..., help="Directory or URL (s3://bucket/built) for the shards and dataset.json."),
    size: int = typer.Option(256, min=16, help="Side of the square training images, in pixels."),
    val_fraction: float = typer.Option(0.05, min=0.0, max=0.9, help="Share of posts held out for validation."),
    test_fraction: float = typer.Option(0.05, min=0.0, max=0.9, help="Share of posts held out for the final test."),
    format: str = typer.Option("jpg", help="Image format in the shards: jpg, webp or png."),
    quality: int = typer.Option(95, min=1, max=100, help="JPEG/WebP quality."),
    workers: int = workers_option("Decoding processes (default: one per core)."),
    shard_size: int = typer.Option(1000, min=1, help="Samples per shard."),
    aliases: str = typer.Option(None, help="Old tag name -> new CSV, as given to `i2v vocab` (a path or URL)."),
) -> None:
    """Build training shards: padded, resized images with their labels, split train/val/test."""
    from .data.build import BuildConfig, build
    from .util import storage

    cfg = BuildConfig(
        dirs=tuple(dirs),
        vocab=vocab,
        out=out,
        size=size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        format=format,
        quality=quality,
        workers=workers,
        shard_size=shard_size,
        aliases=aliases,
    )
    summary = build(cfg, console=err)
    info = summary.info
    for split, stat in info.splits.items():
        err.print(f"{split}: {stat.samples} samples in {len(stat.shards)} shards", highlight=False)
    skipped = ", ".join(f"{n} {reason}" for reason, n in info.skipped.items()) or "none"
    err.print(f"skipped: {skipped}; wrote {storage.display(summary.path)} in {info.seconds:.1f} s", highlight=False)


@app.command()
def train(
    data: str = typer.Argument(
        ..., help="Directory written by `i2v build`, or its URL (s3://bucket/built: shards are streamed)."
    ),
    out: str = typer.Option(..., help="Run directory (local): config.json, checkpoints/, metrics.csv, curves.png."),
    arch: str = typer.Option(
        None, help="A preset (i2v_vgg16, i2v_small, ...) or any timm model name (default: i2v_small, or --init's)."
    ),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(32, min=1),
    lr: float = typer.Option(3e-3, min=0.0),
    weight_decay: float = typer.Option(0.05, min=0.0),
    warmup: float = typer.Option(0.2, min=0.0, help="Epochs of linear warm-up."),
    workers: int = workers_option("Data loader processes (default: cores - 1, at most 8).", minimum=0),
    seed: int = typer.Option(0),
    select_by: str = typer.Option("general/mAP", help="Validation metric that picks the best epoch."),
    loss: str = typer.Option("bce", help="bce or asl, for the sigmoid heads."),
    frequency_weighting: bool = typer.Option(False, help="Scale each tag's loss by its rarity (WD v3)."),
    exclusivity: float = typer.Option(0.0, min=0.0, help="Weight of the penalty on tags that never co-occur."),
    softmax: str = typer.Option(None, help="Comma-separated heads with softmax (default: the preset's)."),
    rating_head: bool = typer.Option(None, help="Add or drop the 4-way rating head (default: the preset's)."),
    freeze: str = typer.Option(None, help="Freeze the backbone up to this named layer (the seed: block4_conv1)."),
    global_pool: str = typer.Option(
        None, help="timm's pooling of the last feature map: avg, max, avgmax, catavgmax (default: the preset's)."
    ),
    pretrained: bool = typer.Option(False, help="Start from ImageNet weights (downloads them through timm)."),
    amp: str = typer.Option("auto", help="auto (bf16 on a GPU), bf16, fp16 or off."),
    device: str = device_option(),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    prior_init: bool = typer.Option(True, help="Start each head's bias at its tags' training frequency."),
    max_bad_samples: int = typer.Option(
        100, min=0, help="Unreadable samples skipped per epoch before the run stops (0: stop at the first)."
    ),
    verify: str = typer.Option(
        "auto", help="Check the shards against dataset.json first: sizes, checksums, or auto (checksums up to 1 GiB)."
    ),
    init: str = typer.Option(
        None, help="Extend a trained tagger: a run (RUN or RUN@EPOCH), a bundle, a WD v3 snapshot or a hub id."
    ),
    vocab: str = typer.Option("union", help="With --init: its tags plus DATA's (union) or DATA's alone (data)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the heads only."),
    backbone_lr_scale: float = typer.Option(
        None, min=0.0, help="The backbone's learning rate over the heads' (default: 0.1 with --init, else 1)."
    ),
    keep_old: float = typer.Option(
        None, min=0.0, help="With --init: weight of the original model's outputs as soft targets (default 1; 0: off)."
    ),
    probe_new: bool = typer.Option(
        None,
        "--probe-new/--no-probe-new",
        help="With --init: fit the new tags' rows on the original's features first (a linear probe); default: when "
        "a tenth of DATA's posts show the original's characters (DATA holds a sample of the old board).",
        show_default=False,
    ),
) -> None:
    """Train a tagger on built shards; checkpoints and curves every epoch. Under torchrun, with DDP."""
    from .train.config import TrainConfig
    from .train.loop import fit
    from .train.losses import LossConfig

    model = {k: v for k, v in (("freeze", freeze), ("global_pool", global_pool)) if v is not None}
    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        **({} if workers is None else {"workers": workers}),
        seed=seed,
        select_by=select_by,
        amp=amp,
        device=device,
        pretrained=pretrained,
        model=model,
        rating_head=rating_head,
        softmax=tuple(s.strip() for s in softmax.split(",") if s.strip()) if softmax is not None else None,
        loss=LossConfig(kind=loss, frequency_weighting=frequency_weighting, exclusivity=exclusivity),
        prior_init=prior_init,
        max_bad_samples=max_bad_samples,
        verify=verify,
        init=init,
        vocab=vocab,
        freeze_backbone=freeze_backbone,
        backbone_lr_scale=backbone_lr_scale,
        keep_old=keep_old,
        probe_new=probe_new,
    )
    summary = fit(cfg, resume=resume, console=err)
    err.print(f"best epoch {summary.best_epoch} by {summary.select_by} = {summary.best:.4f}", highlight=False)


@app.command()
def distill(
    teacher: str = typer.Option(
        ..., help="The model to imitate: a bundle, a WD v3 snapshot, a WD ONNX directory or a hub id."
    ),
    images: list[str] = typer.Option(..., help="Unlabelled images: folders, files or tar shards (repeatable)."),
    student: str = typer.Option(..., help="The student: a preset (i2v_small, ...) or any timm model name."),
    size: int = typer.Option(..., min=16, help="The student's input side in pixels."),
    out: str = typer.Option(..., help="Run directory (local); the teacher's cache goes in OUT/teacher/."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(32, min=1, help="The student's batches."),
    lr: float = typer.Option(3e-3, min=0.0),
    pretrained: bool = typer.Option(False, help="Start the student from ImageNet weights (timm, network)."),
    val_fraction: float = typer.Option(0.1, help="Images held out to measure agreement with the teacher."),
    teacher_cache: str = typer.Option(None, help="Where the teacher's outputs are cached (default: OUT/teacher)."),
    teacher_batch_size: str = typer.Option("auto", help="The teacher's batches: auto (as i2v tag) or a number."),
    backend: str = backend_option(" (the teacher's)"),
    device: str = device_option(),
    workers: int = workers_option("The student's loader processes (default: cores - 1, at most 8).", minimum=0),
    seed: int = typer.Option(0),
    select_by: str = typer.Option("agreement/general/f1", help="Validation metric that picks the best epoch."),
    amp: str = typer.Option("auto", help="auto (bf16 on a GPU), bf16, fp16 or off."),
    resume: bool = typer.Option(
        False, help="Continue the student's training in --out (the teacher pass resumes anyway)."
    ),
    teacher_only: bool = typer.Option(False, "--teacher-only", help="Run the teacher pass alone (fill the cache)."),
) -> None:
    """Train a small student to imitate a teacher on your own images: the teacher's outputs are cached once
    (resumable), then the student learns them; a normal run that `i2v export` makes a bundle of."""
    from .distill import DistillConfig
    from .distill import distill as run_distill

    cfg = DistillConfig(
        teacher=teacher,
        images=tuple(images),
        student=student,
        size=size,
        out=out,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        pretrained=pretrained,
        val_fraction=val_fraction,
        teacher_cache=teacher_cache,
        teacher_batch_size=teacher_batch_size,
        backend=backend,
        device=device,
        **({} if workers is None else {"workers": workers}),
        seed=seed,
        select_by=select_by,
        amp=amp,
        resume=resume,
        teacher_only=teacher_only,
    )
    s = run_distill(cfg, console=err)
    if s.train is None:
        return
    shown = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in s.agreement.items())
    err.print(
        f"best epoch {s.train.best_epoch}: agreement with the teacher on held-out images: {shown}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run directory of `i2v train`."),
    epoch: str = typer.Option("best", help="An epoch number, best (as --select-by chose) or last."),
    data: list[str] = typer.Option(
        None,
        help="Built dataset (a directory or URL) to evaluate on (default: the run's own); several --data: each, "
        "into RUN/eval/epoch-NNN/NAME/ (an extended run's old and new data side by side).",
    ),
    split: str = typer.Option("val", help="val or test."),
    per_tag: bool = typer.Option(False, help="Also calibrate one threshold per tag."),
    mode: str = typer.Option("f1", help="Thresholds that maximise F1 (f1) or make precision equal recall (pr_equal)."),
    batch_size: int = typer.Option(64, min=1),
    workers: int = workers_option("Data loader processes.", 2, minimum=0),
    device: str = device_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    verify: str = typer.Option(
        "auto", help="Check the shards against dataset.json first: sizes, checksums, or auto (checksums up to 1 GiB)."
    ),
) -> None:
    """Per-category metrics of one epoch on held-out images; writes metrics.json, per_tag.csv, thresholds.json."""
    from .evaluate import EvalConfig, evaluate_run, several_outs

    sets = list(data or [None])
    outs = several_outs(str(run), epoch, sets) if len(sets) > 1 else [None]
    reports = []
    for one, out in zip(sets, outs, strict=True):
        cfg = EvalConfig(
            run=str(run),
            epoch=epoch,
            data=str(one) if one else None,
            split=split,
            per_tag=per_tag,
            mode=mode,
            batch_size=batch_size,
            workers=workers,
            device=device,
            verify=verify,
            out=out,
        )
        reports.append(evaluate_run(cfg, console=err).as_dict())
    if json_out:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    for report in reports:
        if len(reports) > 1:
            err.print(f"\n{report['data']}:", highlight=False)
        _print_report(report)


def _print_report(report: dict) -> None:
    from rich import box
    from rich.table import Table

    # Light rules and unwrapped names: ten columns fit the 80 columns rich assumes when stderr is not a terminal.
    title = f"{report['run']} epoch {report['epoch']} on {report['split']}"
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    columns = ("P", "R", "F1", "macroF1", "mAP", "thr", "P=R@", "top1", "acc")
    table.add_column("head", no_wrap=True)
    for c in columns:
        table.add_column(c, justify="right", no_wrap=True)
    keys = {"P": "precision", "R": "recall", "F1": "f1", "macroF1": "macro_f1", "thr": "threshold"}
    keys |= {"P=R@": "threshold_p_eq_r", "acc": "accuracy"}
    for head, r in report["heads"].items():
        cells = [r.get(keys.get(c, c)) for c in columns]
        table.add_row(head, *("" if v is None else f"{v:.3f}" for v in cells))
    err.print(table)
    err.print(f"wrote {report['out']}/metrics.json, per_tag.csv, thresholds.json", highlight=False)


@app.command("export")
def export_bundle(
    run: Path = typer.Argument(..., help="Run directory of `i2v train`."),
    out: str = typer.Option(
        ..., help="Bundle directory (or s3://, gs:// URL) to write; with --for, the front end's models folder."
    ),
    epoch: str = typer.Option("best", help="An epoch number, best or last."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write model.onnx in the WD taggers' convention."),
    target: str = typer.Option(
        None,
        "--for",
        help="Files as a WD front end expects them: wd (the bundle, with ONNX), kohya, comfyui, webui or taggui.",
    ),
    name: str = typer.Option(None, help="The model's name in the front end (default: the run directory's name)."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle in --out (or the front end's files)."),
    workers: int = workers_option("Data loader processes.", 2, minimum=0),
    device: str = device_option(", for the calibration pass"),
) -> None:
    """Write a model bundle (weights, config, labels, thresholds; optionally ONNX) from one epoch of a run, or with
    --for the ONNX file and its labels where kohya, ComfyUI, the webui tagger or taggui look for them."""
    from .export import ExportConfig, export

    cfg = ExportConfig(
        run=str(run),
        out=out,
        epoch=epoch,
        onnx=onnx,
        overwrite=overwrite,
        workers=workers,
        device=device,
        target=target,
        name=name,
    )
    s = export(cfg, console=err)
    onnx_note = f", ONNX within {s.onnx_max_abs_diff:.1e} of torch" if s.onnx_max_abs_diff is not None else ""
    for warning in s.warnings:
        err.print(f"warning: {warning}", highlight=False, markup=False)
    wrote = ", ".join(s.files) if s.files else s.bundle
    err.print(f"wrote {wrote} from epoch {s.epoch} (thresholds: {s.thresholds}{onnx_note})", highlight=False)
    if s.instructions:
        err.print(f"in {s.target}: {s.instructions}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def quantize(
    model: Path = typer.Argument(
        ..., help="A bundle with model.onnx, or a WD ONNX directory (model.onnx, selected_tags.csv)."
    ),
    calibration: list[str] = typer.Option(
        None, help="Calibration images: folders, image files or tar shards (default: the bundle's validation split)."
    ),
    out: Path = typer.Option(None, help="Write a copy of the directory here (default: model.int8.onnx in MODEL)."),
    mode: str = typer.Option("static", help="static (QDQ per channel, calibrated) or dynamic (MatMul/Gemm weights)."),
    images: int = typer.Option(96, help="Images read at most: two thirds calibrate, one third checks agreement."),
    check: list[str] = typer.Option(
        None, help="Held-out images to check agreement on (up to --images); then every calibration image calibrates."
    ),
    min_f1: float = typer.Option(0.97, help="Warn when a category's F1 against fp32's decisions is below this."),
    overwrite: bool = typer.Option(False, help="Replace a copy already in --out."),
) -> None:
    """Add model.int8.onnx (int8 weights, about a quarter of the size) beside model.onnx, and report how far its
    decisions are from fp32's on held-out calibration images."""
    from .quantize import QuantizeConfig
    from .quantize import quantize as run_quantize

    cfg = QuantizeConfig(
        model=str(model),
        calibration=tuple(calibration or ()),
        out=str(out) if out else None,
        mode=mode,
        images=images,
        check=tuple(check or ()),
        min_f1=min_f1,
        overwrite=overwrite,
    )
    s = run_quantize(cfg, console=err)
    f1 = ", ".join(f"{h} {v:.3f}" for h, v in s.f1.items())
    err.print(
        f"wrote {s.model}/model.int8.onnx ({s.mode}): {s.int8_bytes / 1e6:.1f} MB, {s.int8_bytes / s.fp32_bytes:.2f}x "
        f"model.onnx; calibrated on {s.calibration_images} images of {s.calibration_source}, checked on "
        f"{s.check_images}: F1 against fp32's decisions {f1}; largest probability difference {s.max_prob_diff:.4f} "
        f"(recorded in {s.recorded_in})",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    for warning in s.warnings:
        err.print(f"warning: {warning}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Directory for the demo's outputs."),
    posts: int = typer.Option(None, min=50, help="Posts on the synthetic board (default 3000; --quick 300)."),
    epochs: int = typer.Option(None, min=1, help="Training epochs (default 8; --quick 2)."),
    seed: int = typer.Option(0, help="Seed of the synthetic board."),
    quick: bool = typer.Option(False, "--quick", help="A small board, 2 epochs: every stage in about a minute."),
) -> None:
    """The whole flow on the synthetic board, offline: crawl, vocabulary, shards, train, evaluate, export, tag,
    embed, index, similar; writes OUT/report.html."""
    from dataclasses import fields

    from .demo import QUICK, DemoConfig, run_demo

    base = {**{f.name: f.default for f in fields(DemoConfig)}, **(QUICK if quick else {})}
    given = {"posts": posts, "epochs": epochs}
    cfg = DemoConfig(**{**base, **{k: v for k, v in given.items() if v is not None}, "out": out, "seed": seed})
    run_demo(cfg, console=err)


@app.command()
def tag(
    paths: list[str] = typer.Argument(..., help="Images, folders, WebDataset tar shards (*.tar); paths or URLs."),
    model: str = typer.Option(..., help="A bundle (i2v export), a WD tagger v3 snapshot or a WD ONNX directory."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Enter subfolders too."),
    threshold: float = typer.Option(None, help="General tags' threshold (default: the model's calibrated, or 0.35)."),
    character_threshold: float = typer.Option(None, help="Character tags' threshold (default: calibrated, or 0.85)."),
    mcut: bool = typer.Option(False, "--mcut", help="Thresholds per image by MCut, as the WD Space does."),
    format: str = typer.Option(
        None,
        help="table (default; jsonl with --ray), json, jsonl, csv (on stdout); txt (captions), xmp or hydrus "
        "(sidecars) beside images.",
    ),
    out: str = typer.Option(None, help="Write the records to this file or URL instead of stdout (--ray: a folder)."),
    batch_size: str = typer.Option(
        "auto", help="Images per forward pass: a number, or auto (32 on a GPU; on a CPU timed on the first batches)."
    ),
    exclude: str = typer.Option(None, help="Comma-separated tags never to output (either spelling, * wildcards)."),
    replace: str = typer.Option(None, help='Rename or merge tags: "old=new,..." or a CSV file of old,new rows.'),
    max_tags: int = typer.Option(None, min=1, help="Keep the N highest-scoring tags (rating aside)."),
    add: str = typer.Option(None, help="Comma-separated fixed tags written first (a trigger word)."),
    append: bool = typer.Option(False, "--append", help="txt, hydrus: merge into caption files that exist."),
    xmp_name: str = typer.Option("ext", help="xmp: sidecar names, ext (IMAGE.EXT.xmp) or stem (IMAGE.xmp)."),
    embed: bool = typer.Option(False, "--embed", help="xmp: into the image itself (JPEG, PNG, WebP, TIFF)."),
    keep_mtime: bool = typer.Option(False, "--keep-mtime", help="--embed: keep each file's modification time."),
    replace_underscores: bool = typer.Option(False, "--replace-underscores", help="long_hair -> long hair (not ^_^)."),
    escape_brackets: bool = typer.Option(False, "--escape-brackets", help="( ) -> \\( \\), for prompts."),
    rating_first: bool = typer.Option(False, "--rating-first", help="txt: start each caption with its rating tag."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Tag unchanged files again; txt: replace captions."),
    device: str = device_option(),
    backend: str = backend_option(),
    precision: str = precision_option(),
    shard: str = shard_option("files"),
    workers: int = workers_option("Decoding threads (default: one per core)."),
    ray: bool = typer.Option(False, "--ray", help="Run on a Ray cluster, jsonl parts under --out (a folder or URL)."),
    ray_address: str = ray_address_option(),
    actors: int = typer.Option(None, min=1, help="--ray: model actors (default: one per GPU, or per 2 CPUs)."),
    gpus_per_actor: float = typer.Option(None, min=0, help="--ray: GPUs per actor (default: 1 if any, else 0)."),
    part_size: int = typer.Option(1024, min=1, help="--ray: records per part written under --out."),
) -> None:
    """Tag images: records on stdout (or captions beside them), a report of bad files on stderr; exit 1 if any."""
    import os

    from .infer.captions import CaptionRules, parse_replace, split_tags
    from .infer.engine import RayOptions
    from .infer.pipeline import TagConfig, parse_exclude, tag_files
    from .infer.sidecars import CollectionOptions
    from .infer.writers import CaptionOptions

    cfg = TagConfig(
        paths=tuple(paths),
        model=model,
        recursive=recursive,
        threshold=threshold,
        character_threshold=character_threshold,
        mcut=mcut,
        format=format or ("jsonl" if ray or ray_address else "table"),
        batch_size=batch_size,
        exclude=parse_exclude(exclude),
        caption=CaptionOptions(replace_underscores, escape_brackets, rating_first),
        overwrite=overwrite,
        rules=CaptionRules(replace=parse_replace(replace), max_tags=max_tags, add=split_tags(add), append=append),
        collection=CollectionOptions(xmp_name, embed, keep_mtime),
        device=device,
        backend=backend,
        precision=precision,
        shard=shard,
        workers=workers,
        out=out,
        ray=RayOptions(ray_address, actors, gpus_per_actor, part_size) if ray or ray_address else None,
    )
    try:
        summary = tag_files(cfg, out=sys.stdout, console=err)
    except BrokenPipeError:  # stdout closed early (`i2v tag ... | head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(1) from None
    err.print(f"{out}: {summary.line()}" if out else summary.line(), highlight=False, soft_wrap=True)
    if summary.n_failed:
        raise typer.Exit(1)


@app.command()
def show(
    image: Path = typer.Argument(..., help="The image to show."),
    model: Path = typer.Option(..., help="A bundle (i2v export), or a WD tagger's directory (without --explain)."),
    out: Path = typer.Option(..., help="The picture to write (PNG; any format matplotlib writes, by extension)."),
    explain: str = typer.Option(None, help="Overlay a Grad-CAM heat map for this tag (an illust2vec bundle)."),
    top: int = typer.Option(10, min=1, help="Bars per category (rating: all its classes)."),
    threshold: float = typer.Option(None, min=0.0, max=1.0, help="General threshold (default: the model's)."),
    character_threshold: float = typer.Option(None, min=0.0, max=1.0, help="Character threshold."),
    mcut: bool = typer.Option(False, help="MCut thresholds for general and character tags, as the WD Space."),
    backend: str = backend_option(", for the scores (the heat map runs torch)"),
    device: str = device_option(),
) -> None:
    """Draw an image beside bars of its top tags per category; --explain shows where one tag's evidence lies."""
    from .infer.show import ShowConfig
    from .infer.show import show as show_image
    from .infer.thresholds import Selection

    selection = Selection(general=threshold, character=character_threshold, mcut_general=mcut, mcut_character=mcut)
    cfg = ShowConfig(image, model, out, explain, top, selection, backend, device)
    result = show_image(cfg)
    shown = ", ".join(b.tag for head, bars in result.bars.items() if head != "rating" for b in bars if b.above)
    note = f"; Grad-CAM of {result.explained.tag} ({result.explained_score:.3f})" if result.explained else ""
    err.print(f"wrote {out}{note}; highlighted: {shown or 'none'}", highlight=False, soft_wrap=True)


index_app = typer.Typer(help="Build a vector index from `i2v embed` outputs.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@app.command()
def embed(
    paths: list[str] = typer.Argument(..., help="Images, folders, WebDataset tar shards (*.tar); paths or URLs."),
    model: str = typer.Option(..., help="A bundle (i2v export) or a WD tagger v3 snapshot (with feature vectors)."),
    out: str = typer.Option(..., help="Vectors file or URL (Parquet; --ray: a folder of parts); reruns resume."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Enter subfolders too."),
    ids: str = typer.Option("path", help="Row ids: path (relative to the folder given) or stem (e.g. post ids)."),
    batch_size: str = typer.Option(
        "auto", help="Images per forward pass: a number, or auto (32 on a GPU; on a CPU timed on the first batches)."
    ),
    shard: str = shard_option("files"),
    device: str = device_option(),
    backend: str = backend_option(),
    precision: str = precision_option(),
    workers: int = workers_option("Decoding threads (default: one per core)."),
    ray: bool = typer.Option(False, "--ray", help="Run on a Ray cluster, Parquet parts under --out (a folder/URL)."),
    ray_address: str = ray_address_option(),
    actors: int = typer.Option(None, min=1, help="--ray: model actors (default: one per GPU, or per 2 CPUs)."),
    gpus_per_actor: float = typer.Option(None, min=0, help="--ray: GPUs per actor (default: 1 if any, else 0)."),
    part_size: int = typer.Option(1024, min=1, help="--ray: rows per part written under --out."),
) -> None:
    """Feature vectors and predicted tags of images, from one forward pass each, into Parquet; exit 1 if any failed."""
    from .infer.embed import EmbedConfig, embed_files
    from .infer.engine import RayOptions

    cfg = EmbedConfig(
        paths=tuple(paths),
        model=model,
        out=str(out),
        recursive=recursive,
        ids=ids,
        batch_size=batch_size,
        shard=shard,
        device=device,
        backend=backend,
        precision=precision,
        workers=workers,
        ray=RayOptions(ray_address, actors, gpus_per_actor, part_size) if ray or ray_address else None,
    )
    summary = embed_files(cfg, console=err)
    err.print(f"{out}: {summary.line()}", highlight=False, soft_wrap=True)
    if summary.n_failed:
        raise typer.Exit(1)


@index_app.command("build")
def index_build(
    vectors: list[str] = typer.Argument(
        ..., help="Vectors files of `i2v embed` (e.g. one per shard), or folders; paths or URLs (s3://...)."
    ),
    out: str = typer.Option(..., help="Index directory to write, or a URL (s3://bucket/index)."),
    kind: str = typer.Option("auto", help="auto, flat (exact), hnsw, ivf (approximate) or binary (Hamming)."),
    nlist: int = typer.Option(None, min=1, help="ivf: k-means cells (default about 4 sqrt(N))."),
    nprobe: int = typer.Option(16, min=1, help="ivf: cells searched per query (more: better recall, slower)."),
    ef_search: int = typer.Option(128, min=1, help="hnsw: candidates kept while searching."),
) -> None:
    """Build a searchable index of feature vectors, with their ids, paths and tags."""
    from .search import IndexParams, build_index

    params = IndexParams(kind=kind, nlist=nlist, nprobe=nprobe, ef_search=ef_search)
    summary = build_index([str(v) for v in vectors], out, params)
    err.print(summary.line(), highlight=False, soft_wrap=True)


def _print_hits(rows: list[dict], format: str, title: str) -> None:
    if format == "json":
        print(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in rows[0] if rows else ("id", "path", "score"):
        table.add_column(c, justify="right" if c in ("score", "group", "rank") else "left")
    for r in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()))
    Console(soft_wrap=True).print(table)


@app.command()
def similar(
    image: str = typer.Argument(None, help="The query image (needs --model)."),
    id: str = typer.Option(None, "--id", help="Query by the id of an image in the index instead."),
    index: Path = typer.Option(..., help="Index directory of `i2v index build`."),
    model: str = typer.Option(None, help="The model the index's vectors came from (for an IMAGE query)."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="How many results."),
    tags: str = typer.Option(None, help='Only images with these predicted tags, not the "-" ones: "blue_hair -hat".'),
    format: str = typer.Option("table", help="table or json (a list of {path, id, score} on stdout)."),
    backend: str = backend_option(),
    device: str = device_option(),
) -> None:
    """The images most like a query image, best first (the query itself first when it is in the index)."""
    from .formats.vectors import model_meta
    from .infer.tagger import Tagger
    from .search import SimilarConfig, VectorIndex, check_model
    from .search import similar as find_similar
    from .util.images import BadImage

    if format not in ("table", "json"):
        raise UserError(f"--format must be table or json, not {format!r}")
    cfg = SimilarConfig(index=str(index), image=image, id=id, k=k, tags=tags)
    vi = VectorIndex.load(index)
    query = None
    if image is not None:  # embedded here, with the index's model: search never loads a model
        if not model:
            raise UserError("a query image needs the model its index was built with: --model BUNDLE")
        if not Path(image).is_file():
            raise UserError(f"{image}: no such image file")
        tagger = Tagger.load(model, backend=backend, device=device)
        check_model(vi, model_meta(tagger), model)
        try:
            query = tagger.extract_feature([image], normalize=True)[0]
        except BadImage as e:
            raise UserError(f"{image}: {e}") from None
    hits = find_similar(cfg, vi, query)
    _print_hits([h.to_json() for h in hits], format, f"most similar to {image or id}")
    if not hits:
        err.print("no image in the index passes --tags", highlight=False)


@app.command()
def dedup(
    index: Path = typer.Argument(..., help="Index directory of `i2v index build`."),
    threshold: float = typer.Option(
        None, help="Cosine similarity at which two images count as copies (default 0.99; binary: bits agreeing)."
    ),
    format: str = typer.Option("table", help="table or json (a list of groups, each a list of {path, id, score})."),
) -> None:
    """Groups of near-duplicate images (resized, re-encoded copies): each group's first image, then its copies."""
    from .search import DedupConfig
    from .search import dedup as find_groups

    if format not in ("table", "json"):
        raise UserError(f"--format must be table or json, not {format!r}")
    summary = find_groups(DedupConfig(index=str(index), threshold=threshold))
    if format == "json":
        print(json.dumps(summary.as_json(), indent=1))
    else:
        rows = [{"group": n, **h} for n, g in enumerate(summary.as_json(), 1) for h in g]
        _print_hits(rows, "table", f"near-duplicates in {index} (similarity to each group's first image)")
    err.print(summary.line(), highlight=False, soft_wrap=True)


@app.command()
def serve(
    model: Path = typer.Option(..., help="Model bundle (i2v export), or a WD tagger's directory."),
    index: Path = typer.Option(None, help="Vector index (i2v index build) for similar images."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, min=0, max=65535),
    max_upload_mb: float = typer.Option(32.0, min=0.001, help="Largest upload accepted, in MB (413 beyond)."),
    max_batch: str = typer.Option(
        "auto", help="Most images in one forward pass: a number (1: no batching) or auto, as i2v tag's --batch-size."
    ),
    max_wait_ms: float = typer.Option(5.0, min=0.0, help="How long a request waits for others to join its batch."),
    backend: str = backend_option(),
    precision: str = precision_option(),
    device: str = device_option(),
) -> None:
    """Serve a web page and an HTTP API for tagging images and finding similar ones (OpenAPI docs at /docs)."""
    from .serve import ServeConfig
    from .serve import serve as run_server

    cfg = ServeConfig(
        model=str(model),
        index=str(index) if index else None,
        host=host,
        port=port,
        max_upload_mb=max_upload_mb,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        backend=backend,
        precision=precision,
        device=device,
    )
    run_server(cfg, console=err)


convert = typer.Typer(help="Bring other taggers' models over as illust2vec bundles.", no_args_is_help=True)
app.add_typer(convert, name="convert")


@convert.command("keras")
def convert_keras_cmd(
    weights: Path = typer.Argument(..., help="The seed's Keras HDF5 file (model.save or save_weights; Keras 2 or 3)."),
    tags: Path = typer.Option(
        ..., help="Tag lists: JSON, CSV (selected_tags.csv or category,name) or the seed's pickle."
    ),
    out: Path = typer.Option(..., help="Bundle directory to write."),
    preprocess: str = typer.Option(
        "caffe", help="The Keras preprocess_input mode the model was trained with: caffe, tf or torch."
    ),
    size: int = typer.Option(None, min=96, help="Input size (default: the file's, else 256)."),
    head_order: str = typer.Option(
        None, help="The heads of dense_1/2, dense_3/4, dense_5/6, e.g. character,copyright,general (default: found)."
    ),
    onnx: bool = typer.Option(False, "--onnx", help="Also write model.onnx in the WD taggers' convention."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle in --out."),
) -> None:
    """Convert the seed's Keras weights and tag lists into a bundle for i2v tag, show, embed and serve."""
    from .convert import ConvertConfig, convert_keras

    order = tuple(h.strip() for h in head_order.split(",")) if head_order else None
    cfg = ConvertConfig(
        weights=str(weights),
        tags=str(tags),
        out=str(out),
        preprocess=preprocess,
        size=size,
        head_order=order,
        onnx=onnx,
        overwrite=overwrite,
    )
    s = convert_keras(cfg)
    for head, layers in s.dense.items():
        err.print(f"{head}: {layers}", highlight=False)
    counts = ", ".join(f"{n} {h}" for h, n in s.tags.items())
    onnx_note = f", ONNX within {s.onnx_max_abs_diff:.1e} of torch" if s.onnx_max_abs_diff is not None else ""
    err.print(
        f"wrote {out}: {s.layout} weights, heads by {s.dense_resolved_by}, {counts} tags, "
        f"{s.image_size} px, {s.preprocess} preprocessing{onnx_note}",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point: a user's mistake becomes one line on stderr and exit status 2."""
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as e:
        print(e.format_message(), file=sys.stderr)
        sys.exit(2)
    except click_exceptions.UsageError as e:
        path = e.ctx.command_path if e.ctx else "i2v"
        print(f"error: {e.format_message()} (see '{path} --help')", file=sys.stderr)
        sys.exit(2)
    except click_exceptions.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
