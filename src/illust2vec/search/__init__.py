"""Similar-image search: a vector index (exact, HNSW, IVF or binary codes; faiss) and queries over it."""

from .index import IndexParams, VectorIndex
from .similar import Hit, build_index, find_duplicates, similar

__all__ = ["Hit", "IndexParams", "VectorIndex", "build_index", "find_duplicates", "similar"]
