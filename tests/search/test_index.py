"""VectorIndex: exact search equals numpy brute force, approximate kinds find the true neighbours on clustered data,
binary codes find copies by Hamming distance, filters, and one-line errors (the files: tests/formats/test_index.py)."""

import numpy as np
import pytest

from illust2vec.errors import UserError
from illust2vec.search import IndexParams, VectorIndex
from illust2vec.search.index import EXACT_UP_TO


def clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = unit(queries) @ unit(base).T
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, rows, 1), rows


def ids_of(n: int) -> list[str]:
    return [f"img{i:05d}" for i in range(n)]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


def test_flat_equals_numpy_brute_force():
    base, queries = clustered(800), clustered(20, seed=1)
    index = VectorIndex.build(base, ids_of(800), params=IndexParams(kind="flat"))
    scores, rows = index.search_rows(queries, 10)
    want_scores, want_rows = brute_force(base, queries, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # the same neighbours; ties in the 10th score could swap order, so compare the scores of what each returns
    np.testing.assert_allclose(np.take_along_axis(unit(queries) @ unit(base).T, rows, 1), want_scores, atol=1e-5)
    assert recall(rows, want_rows) == 1.0


def test_search_gives_ids_and_scores_highest_first():
    base = clustered(100)
    index = VectorIndex.build(base, ids_of(100), params=IndexParams(kind="flat"))
    [hits] = index.search(base[7], k=5)
    assert hits[0] == ("img00007", pytest.approx(1.0, abs=1e-5))
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert len(hits) == 5


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_have_high_recall_on_clustered_data(kind):
    both = clustered(6050, dim=48, clusters=60)
    base, queries = both[:6000], both[6000:]  # queries from the same mixture, not in the index
    index = VectorIndex.build(base, ids_of(6000), params=IndexParams(kind=kind, nlist=64, nprobe=16))
    assert index.kind == kind
    _, rows = index.search_rows(queries, 10)
    _, truth = brute_force(base, queries, 10)
    assert recall(rows, truth) >= 0.9


def test_auto_is_exact_for_small_collections_and_ivf_for_large_ones():
    assert IndexParams().resolved(1000).kind == "flat"
    big = IndexParams().resolved(EXACT_UP_TO + 1)
    assert big.kind == "ivf" and big.nlist == int(4 * np.sqrt(EXACT_UP_TO + 1))
    assert IndexParams(kind="hnsw").resolved(10).kind == "hnsw"
    index = VectorIndex.build(clustered(50), ids_of(50))
    assert index.kind == "flat"


def test_binary_hamming_finds_an_exact_copy_first():
    base = clustered(500, dim=64)
    index = VectorIndex.build(base, ids_of(500), params=IndexParams(kind="binary"))
    assert index.center is not None and index.center.shape == (64,)
    scores, rows = index.search_rows(base[[3, 42, 311]], 5)
    assert rows[:, 0].tolist() == [3, 42, 311]
    np.testing.assert_allclose(scores[:, 0], 1.0)  # every bit agrees
    # a slightly perturbed copy still finds its original
    noisy = base[[3]] + 0.01 * np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    assert index.search_rows(noisy, 1)[1][0, 0] == 3
    # the stored codes query as well as float vectors do
    code = index.vector("img00042")
    assert code.dtype == np.uint8 and code.shape == (8,)
    assert index.search_rows(code[None], 1)[1][0, 0] == 42


def test_allow_mask_restricts_results_exactly():
    base = clustered(300)
    index = VectorIndex.build(base, ids_of(300), params=IndexParams(kind="flat"))
    allow = np.zeros(300, bool)
    allow[::7] = True
    scores, rows = index.search_rows(base[:4], 10, allow)
    assert allow[rows].all()
    s = unit(base[:4]) @ unit(base[allow]).T
    np.testing.assert_allclose(scores, -np.sort(-s, axis=1)[:, :10], atol=1e-5)
    # fewer allowed rows than k: the rest are -1
    few = np.zeros(300, bool)
    few[[5, 9]] = True
    _, rows = index.search_rows(base[:1], 5, few)
    assert sorted(rows[0, :2].tolist()) == [5, 9] and (rows[0, 2:] == -1).all()


def test_add_in_steps_then_search(tmp_path):
    base = clustered(400)
    index = VectorIndex(32, kind="flat")
    index.add(base[:150], ids_of(400)[:150])
    index.add(base[150:], ids_of(400)[150:])
    assert len(index) == 400
    _, rows = index.search_rows(base[[399]], 1)
    assert rows[0, 0] == 399
    index.save(tmp_path / "idx")
    assert len(VectorIndex.load(tmp_path / "idx")) == 400


def test_bad_input_is_one_clear_error(tmp_path):
    index = VectorIndex.build(clustered(20), ids_of(20))
    with pytest.raises(UserError, match="duplicate id 'img00003'"):
        index.add(clustered(1), ["img00003"])
    with pytest.raises(UserError, match="dimension 32"):
        index.search_rows(np.zeros((1, 5), np.float32), 3)
    with pytest.raises(UserError, match="not an index"):
        VectorIndex.load(tmp_path)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"kind": "lsh"}, "--kind must be one of auto, flat, hnsw, ivf, binary, not 'lsh'"),
        ({"nlist": 0}, "--nlist must be"),
        ({"nprobe": 0}, "--nprobe must be"),
        ({"ef_search": -3}, "--ef-search must be"),
        ({"hnsw_m": 1.5}, "hnsw_m must be"),
        ({"train_size": None}, "train_size must be"),
    ],
)
def test_index_params_check_themselves(fields, words):
    with pytest.raises(UserError, match=words):
        IndexParams(**fields)
    assert IndexParams(nlist=None).nlist is None and IndexParams(nlist=7).resolved(10_000).nlist == 7
