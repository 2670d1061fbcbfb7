"""Run the benchmarks in bench/: `python -m bench` runs all, `python -m bench NAME [ARGS]` runs one (`make bench`)."""

import sys

from . import capacity, crawl, data, extend, fakebooru, fast, quality, search, serve, storage, tag, train

# name -> entry point taking the remaining arguments
BENCHMARKS = {
    "fakebooru": lambda argv: fakebooru.main(),
    "capacity": capacity.main,
    "crawl": crawl.main,
    "extend": extend.main,
    "fast": fast.main,
    "data": data.main,
    "loader": data.loader_vs_model,
    "skew": data.skew,
    "quality": quality.main,
    "search": search.main,
    "serve": serve.main,
    "storage": storage.main,
    "tag": tag.main,
    "train": train.main,
}


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench [{'|'.join(BENCHMARKS)}] [ARGS]  (no name: all of them, with ARGS for each)")
        return
    if argv and not argv[0].startswith("-"):
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS:
            sys.exit(f"error: no benchmark {name!r}; there are: {', '.join(BENCHMARKS)}")
        BENCHMARKS[name](rest)
        return
    for run in BENCHMARKS.values():
        run(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
