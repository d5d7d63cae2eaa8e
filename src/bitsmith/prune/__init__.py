"""Pruning passes: block-sparse pruning and BSR packing, and the `recover` distillation pass."""

from . import block_sparse, recover  # noqa: F401,E401  (register the passes)
