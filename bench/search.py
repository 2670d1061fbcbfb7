"""Similar-image search: speed and recall of the approximate index against exact numpy search, and retrieval quality.

`python -m bench search` (default: 1,000,000 vectors of 512 dimensions): builds an IVF index (VectorIndex, faiss)
and, beside it, answers the same queries by brute force (one numpy matrix product over all vectors). It prints build
time, memory, per-query latency for one query at a time and for a batch, and recall@10 of the IVF answers against
the exact ones, for several `nprobe`.

The vectors have the structure of real embeddings, not uniform noise: a two-level Gaussian mixture (series ->
characters -> images: 100 series, 5,000 characters, 200 images each on average) whose within-cluster spread
decays over dimensions as a power law (most variance in a few dozen directions) under a random rotation, then
L2-normalised. Queries are fresh draws from the same mixture.

`python -m bench search --quality --model BUNDLE`: precision@10 of sharing the query's character and of sharing its
series, over held-out images of a synthetic board (the training board's seed, posts past those trained on), through
`embed_files` and a flat index: the README's figures. It also prints how near-duplicates (resized, re-encoded
copies) and distinct images score, for the choice of `i2v dedup`'s threshold.
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from illust2vec.search import IndexParams, VectorIndex


def rss_gb() -> float:
    """This process's resident memory now, in GB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def clustered(n: int, dim: int, seed: int = 0, series: int = 100, clusters: int = 5000) -> np.ndarray:
    """n unit vectors from a two-level Gaussian mixture with a power-law spectrum (see the module docstring)."""
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    spectrum = (np.arange(1, dim + 1, dtype=np.float32) ** -0.5).astype(np.float32)
    spectrum /= np.sqrt((spectrum**2).sum())  # noise of unit expected norm
    tops = rng.standard_normal((series, dim)).astype(np.float32) / np.sqrt(dim)
    parent = rng.integers(0, series, clusters)
    centers = tops[parent] + 0.8 * rng.standard_normal((clusters, dim)).astype(np.float32) / np.sqrt(dim)
    sizes = rng.zipf(1.3, clusters).astype(np.float64)  # a long tail: a few characters are drawn far more often
    weights = np.minimum(sizes, 200) / np.minimum(sizes, 200).sum()
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        which = rng.choice(clusters, m, p=weights)
        noise = (rng.standard_normal((m, dim)).astype(np.float32) * spectrum) @ rotation
        x = centers[which] + 0.9 * noise
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute force, the baseline: one matrix product per block of queries, then a partial sort."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), 64):
        s = queries[start : start + 64] @ base.T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        out[start : start + 64] = np.take_along_axis(top, order, 1)
    return out


def speed(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    both = clustered(args.n + args.queries, args.dim, seed=0)
    base, queries = both[: args.n], both[args.n :]  # queries: the same mixture, points not in the base
    print(f"search: {args.n:,} x {args.dim} vectors (Gaussian mixture), made in {time.perf_counter() - t0:.0f} s")
    print(f"  RSS with the vectors: {rss_gb():.2f} GB ({base.nbytes / 1e9:.2f} GB of float32)")

    # -- exact numpy search, the baseline
    t0 = time.perf_counter()
    truth = exact_topk(base, queries, 10)
    exact_batch = (time.perf_counter() - t0) / len(queries)
    single = queries[: args.single]
    t0 = time.perf_counter()
    for q in single:
        s = base @ q
        np.argpartition(-s, 10)[:10]
    exact_single = (time.perf_counter() - t0) / len(single)
    print(f"  exact numpy: {exact_single * 1e3:.1f} ms per query alone, {exact_batch * 1e3:.2f} ms per query batched")

    ids = [str(i) for i in range(args.n)]
    for kind in args.kinds.split(","):
        rss0 = rss_gb()
        t0 = time.perf_counter()
        index = VectorIndex.build(base, ids, params=IndexParams(kind=kind, nlist=args.nlist))
        build_s = time.perf_counter() - t0
        grown = rss_gb() - rss0
        extra = f", {index.faiss_index.nlist} cells" if kind == "ivf" else ""
        print(f"  {kind}: built in {build_s:.0f} s{extra}; RSS grew {grown:.2f} GB")
        knobs = [int(x) for x in args.nprobe.split(",")] if kind == "ivf" else [int(x) for x in args.ef.split(",")]
        print(
            f"    {'nprobe' if kind == 'ivf' else 'efSearch':>8}  recall@10  ms/query alone  speed-up  "
            "ms/query batched  speed-up"
        )
        for knob in knobs:
            if kind == "ivf":
                index.params = IndexParams(kind="ivf", nlist=index.params.nlist, nprobe=knob)
            else:
                index.params = IndexParams(kind=kind, ef_search=knob)
            t0 = time.perf_counter()
            _, rows = index.search_rows(queries, 10)
            batch = (time.perf_counter() - t0) / len(queries)
            t0 = time.perf_counter()
            for q in single:
                index.search_rows(q[None], 10)
            alone = (time.perf_counter() - t0) / len(single)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth, strict=True)])
            print(
                f"    {knob:>8}  {recall:>9.3f}  {alone * 1e3:>14.2f}  {exact_single / alone:>7.0f}x  "
                f"{batch * 1e3:>16.3f}  {exact_batch / batch:>7.0f}x"
            )
        del index


# ---- retrieval quality on the synthetic board


def quality(args: argparse.Namespace) -> None:
    from PIL import Image

    from illust2vec.infer.embed import EmbedConfig, embed_files
    from illust2vec.infer.preprocess import read_image
    from illust2vec.infer.tagger import Tagger
    from illust2vec.search import build_index
    from illust2vec.synth.board import Board
    from illust2vec.synth.cast import SynthConfig

    if not args.model:
        raise SystemExit("error: --quality needs --model BUNDLE (e.g. the demo's bundle)")
    tagger = Tagger.load(args.model)
    known = {tagger.labels.names[i] for i in tagger.labels.heads.get("character", ())}
    board = Board(SynthConfig(posts=args.posts, seed=args.seed))
    held = [p for p in board.posts[args.train_posts :] if p.is_image and not p.is_deleted and not p.is_banned]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        for p in held:
            (root / "images" / f"{p.id}.{p.file_ext}").write_bytes(board.file(p))
        t0 = time.perf_counter()
        embed_files(
            EmbedConfig(paths=(str(root / "images"),), model=args.model, out=str(root / "v.parquet"), ids="stem"),
            tagger=tagger,
        )
        seconds = time.perf_counter() - t0
        index = build_index([root / "v.parquet"], root / "index", IndexParams(kind="flat")).index
        # near-duplicates: copies of the first queries, halved with Lanczos and re-encoded as JPEG quality 75
        originals = held[: args.copies]
        copies = []
        for p in originals:
            im = read_image(board.file(p))
            im = im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=75)
            copies.append(buf.getvalue())
        copy_vecs = tagger.extract_feature(copies, normalize=True)
    post_of = {str(p.id): p for p in held}
    rows = np.arange(len(index))
    posts = [post_of[i] for i in index.ids]
    queries = [r for r, p in zip(rows, posts, strict=True) if len(p.tags["character"]) == 1]
    queries = [r for r in queries if posts[r].tags["character"][0] in known]
    _, found = index.search_rows(index.vectors(np.array(queries)), args.k + 1)
    p_char, p_series, best_char, best_series = [], [], [], []
    for q, nn in zip(queries, found, strict=True):
        nn = [int(r) for r in nn if r != q][: args.k]
        char, series = posts[q].tags["character"][0], posts[q].tags["copyright"][0]
        p_char.append(np.mean([char in posts[r].tags["character"] for r in nn]))
        p_series.append(np.mean([series in posts[r].tags["copyright"] for r in nn]))
        # what a perfect ranking could reach: fewer than k other images of a rare character cap its precision
        best_char.append(min(args.k, sum(char in p.tags["character"] for p in posts) - 1) / args.k)
        best_series.append(min(args.k, sum(series in p.tags["copyright"] for p in posts) - 1) / args.k)
    print(
        f"search quality: {args.model}, board seed {args.seed}, posts {args.train_posts}..{args.posts} "
        f"({len(index)} held-out images embedded in {seconds:.0f} s), {len(queries)} single-character queries "
        "of characters in the model's vocabulary"
    )
    print(f"  precision@{args.k} character: {np.mean(p_char):.3f}  (a perfect ranking: {np.mean(best_char):.3f})")
    print(f"  precision@{args.k} series:    {np.mean(p_series):.3f}  (a perfect ranking: {np.mean(best_series):.3f})")

    vecs = index.vectors(rows)
    originals_rows = [index.rows_by_id()[str(p.id)] for p in originals]
    copy_sim = (vecs[originals_rows] * copy_vecs).sum(1)
    sims = vecs @ vecs.T
    pairs = sims[np.triu_indices(len(sims), 1)]
    print(
        f"  copies (half size, JPEG q75) of {len(copies)} images: cosine to the original min {copy_sim.min():.4f}, "
        f"median {np.median(copy_sim):.4f}"
    )
    for t in (0.98, 0.99, 0.995):
        caught = (copy_sim >= t).mean()
        print(f"  threshold {t}: copies found {caught:.0%}; distinct pairs above it {np.mean(pairs >= t):.3%}")
    print(json.dumps({"precision_character": float(np.mean(p_char)), "precision_series": float(np.mean(p_series))}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench search")
    parser.add_argument("--quality", action="store_true", help="retrieval quality on the synthetic board instead")
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500, help="queries for recall and batched latency")
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--kinds", default="ivf", help="comma-separated: ivf, hnsw (slow to build at 1M on 2 cores)")
    parser.add_argument("--nlist", type=int, default=None, help="ivf cells (default: about 4 sqrt(n))")
    parser.add_argument("--nprobe", default="8,16,32,64")
    parser.add_argument("--ef", default="32,64,128")
    parser.add_argument("--model", help="--quality: the bundle to measure (e.g. the demo's)")
    parser.add_argument("--posts", type=int, default=1600, help="--quality: posts on the board")
    parser.add_argument("--train-posts", type=int, default=1000, help="--quality: posts the model was trained on")
    parser.add_argument("--seed", type=int, default=0, help="--quality: the training board's seed")
    parser.add_argument("--copies", type=int, default=50, help="--quality: near-duplicates made")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args(argv)
    (quality if args.quality else speed)(args)


if __name__ == "__main__":
    main()
