"""Quantizing passes: FineQuant group-wise int, bipolar-INT, BCQ."""

from . import finequant  # noqa: F401  (registers the pass)
