"""The one owner of every on-disk contract between the stages, for reading and for writing (docs/architecture.md).

One module per format; each defines its format version once. Stages read and write files only through these.
"""
