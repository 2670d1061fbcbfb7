"""`i2v serve`: a web page and an HTTP API for tags and similar images, with dynamic batching."""

from .app import ServeConfig, create_app, serve
from .batcher import Batcher, BatchStats

__all__ = ["Batcher", "BatchStats", "ServeConfig", "create_app", "serve"]
