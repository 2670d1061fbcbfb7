"""The `i2v` command line: parse arguments, call one library function, print.

Machine-readable output goes to stdout alone; progress, logs and summaries go to stderr. A user's
mistake is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages to stderr.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    bad_md5_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Fault: fraction of files not matching md5."),
    rate_limit: int = typer.Option(0, min=0, help="Fault: requests per second before 429 (0: no limit)."),
    latency: float = typer.Option(0.0, min=0.0, help="Fault: seconds added to every answer."),
) -> None:
    """Serve the synthetic board; prints its URL as the first line on stdout once it listens."""
    from .synth.cast import SynthConfig
    from .synth.server import Faults, serve_board

    cfg = SynthConfig(posts=posts, seed=seed, characters=characters, series=series, label_noise=label_noise)
    faults = Faults(
        error_rate=error_rate,
        truncate_rate=truncate_rate,
        bad_md5_rate=bad_md5_rate,
        rate_limit=rate_limit,
        slow_rate=1.0 if latency > 0 else 0.0,
        slow_seconds=latency,
    )
    serve_board(cfg, host=host, port=port, faults=faults)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Directory for the demo's outputs."),
    posts: int = typer.Option(300, min=20, help="Posts on the synthetic board."),
    seed: int = typer.Option(0, help="Seed of the synthetic board."),
) -> None:
    """Run the whole flow that exists so far on the synthetic board, offline."""
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=out, posts=posts, seed=seed), console=err)


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
