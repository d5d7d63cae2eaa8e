"""Pruning passes: block-sparse pruning and BSR packing, the `recover` distillation pass, DeepShape."""

from . import block_sparse, recover  # noqa: F401,E401  (register the passes)
from . import deepshape  # noqa: F401  (registers the pass)
