"""illust2vec: build and use taggers for anime-style illustrations."""

__version__ = "0.1.0"
