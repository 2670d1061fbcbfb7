"""Shared utilities every stage may import: image decoding and resizing, the core count."""
