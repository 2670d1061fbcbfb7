"""Data preparation: vocabulary, image decoding, training shards and the loader."""
