"""Similar-image search: a vector index (exact, HNSW, IVF or binary codes; faiss) and queries over it."""

from .index import IndexParams, VectorIndex
from .similar import (
    BuildSummary,
    DedupConfig,
    DedupSummary,
    Hit,
    SimilarConfig,
    build_index,
    check_model,
    dedup,
    find_duplicates,
    similar,
)

__all__ = [
    "BuildSummary",
    "DedupConfig",
    "DedupSummary",
    "Hit",
    "IndexParams",
    "SimilarConfig",
    "VectorIndex",
    "build_index",
    "check_model",
    "dedup",
    "find_duplicates",
    "similar",
]
