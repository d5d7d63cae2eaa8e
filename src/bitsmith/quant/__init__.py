"""Quantizing passes: FineQuant group-wise int, bipolar-INT, BCQ, RF8."""

from . import finequant  # noqa: F401  (registers the pass)
from . import bipolar, bcq  # noqa: F401,E401  (register the passes)
from . import rf8  # noqa: F401  (registers the pass)
