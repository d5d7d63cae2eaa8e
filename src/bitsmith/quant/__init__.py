"""Quantizing passes: FineQuant group-wise int, bipolar-INT, BCQ."""

from . import finequant  # noqa: F401  (registers the pass)
from . import bipolar, bcq  # noqa: F401,E401  (register the passes)
