"""illust2vec: build and use taggers for anime-style illustrations."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from illust2vec import Tagger` without importing numpy, PIL or onnxruntime for every `i2v` command.
    if name == "Tagger":
        from .infer.tagger import Tagger

        return Tagger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Tagger", "__version__"]
