"""Clipping search: per group, the range shrink factor that minimises the squared reconstruction error.

Round-to-nearest sets each group's scale from its extreme weight, so one outlier stretches the grid for the whole
group. Shrinking the range by a factor c < 1 clips that outlier but gives every other weight a finer grid. Per group
we try c on a fixed grid (1.0 first) and keep the factor with the least squared error of the dequantized group; the
scale is computed from the clipped range and rounded to its storage dtype, and the codes follow from that scale, so
the error measured is the error stored. c = 1.0 is plain round-to-nearest and a factor must be strictly better to
replace it: the search never increases any group's error. Weights only, no calibration data.
"""

from __future__ import annotations

import torch

from .groupwise import group_sq_error, pad_to_groups

MAX_CHUNK_ELEMENTS = 1 << 24  # rows are searched in chunks of at most this many weights (memory stays bounded)


def clip_grid(bits: int, steps: int = 20) -> tuple[float, ...]:
    """Shrink factors tried, 1.0 first. Low bit widths gain from deep clipping; int8 only from a little."""
    lowest = 0.5 if bits <= 4 else 0.8
    return tuple(1.0 - (1.0 - lowest) * i / steps for i in range(steps + 1))


def search_clip(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_divisor: str,
                scale_dtype: torch.dtype, grid: tuple[float, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best clip factor per group for w [N, K].

    Returns (clip [N, G] float32, error with that clip [N, G], round-to-nearest error [N, G]); errors are sums of
    squares over each group.
    """
    grid = grid or clip_grid(bits)
    wg, _ = pad_to_groups(w.to(torch.float32), group_size)  # [N, G, g]
    N, G, g = wg.shape
    clip = torch.ones(N, G)
    best = torch.empty(N, G)
    rtn = torch.empty(N, G)
    rows = max(1, MAX_CHUNK_ELEMENTS // (G * g))
    for r0 in range(0, N, rows):
        chunk = wg[r0:r0 + rows]
        base = group_sq_error(chunk, bits, symmetric, scale_divisor, scale_dtype, None)
        rtn[r0:r0 + rows] = base
        b, c_best = base.clone(), clip[r0:r0 + rows]
        for c in grid:
            if c == 1.0:
                continue
            c = torch.tensor(c, dtype=torch.float32)  # the exact float32 factor stored in `clip`
            err = group_sq_error(chunk, bits, symmetric, scale_divisor, scale_dtype, c)
            better = err < b
            b = torch.where(better, err, b)
            c_best.masked_fill_(better, c)
        best[r0:r0 + rows] = b
    return clip, best, rtn
