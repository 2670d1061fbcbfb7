"""The tagger model, defined once: configs, presets, the factory, and the seed's architecture."""

from .seed import I2VVGG16, SEED_BACKBONE
from .tagger import PRESETS, HeadConfig, TaggerConfig, TaggerNet, create_tagger, default_heads, load_tagger

__all__ = [
    "PRESETS",
    "SEED_BACKBONE",
    "HeadConfig",
    "I2VVGG16",
    "TaggerConfig",
    "TaggerNet",
    "create_tagger",
    "default_heads",
    "load_tagger",
]
