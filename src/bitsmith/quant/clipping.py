"""Clipping search: per group, the range shrink factor that minimises the squared reconstruction error.

Round-to-nearest sets each group's scale from its extreme weight, so one outlier stretches the grid for the whole
group. Shrinking the range by a factor c < 1 clips that outlier but gives every other weight a finer grid. Per group
we search c in [lowest, 1] (lowest = 0.5 for b <= 4 bits, 0.8 above): a coarse grid of 6 factors, then two
refinements around each group's best (half, then a quarter of the coarse step), 10 error evaluations in all,
resolution (1 - lowest) / 20. The scale is computed from the clipped range and rounded to its storage dtype, and the
codes follow from that scale, so the error measured is the error stored. c = 1 (plain round-to-nearest) is the
starting point and a factor must be strictly better to replace it: the search never increases any group's error.
Weights only, no calibration data.
"""

from __future__ import annotations

import torch

from .groupwise import group_sq_error, pad_to_groups

# Rows are searched in chunks of at most this many weights, so memory stays bounded (a few float32 copies of a
# chunk). On an accelerator the chunks are larger: there the cost is the number of kernel launches, not memory.
MAX_CHUNK_ELEMENTS = 1 << 22
MAX_CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
COARSE_STEPS = 5


def lowest_clip(bits: int) -> float:
    """Low bit widths gain from deep clipping; int8 only from a little."""
    return 0.5 if bits <= 4 else 0.8


def _search_chunk(wg: torch.Tensor, bits: int, symmetric: bool, scale_divisor: str, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rtn = group_sq_error(wg, bits, symmetric, scale_divisor, scale_dtype, None)
    best, clip = rtn.clone(), torch.ones_like(rtn)
    lo = lowest_clip(bits)
    step = (1.0 - lo) / COARSE_STEPS

    def consider(c: torch.Tensor) -> None:
        err = group_sq_error(wg, bits, symmetric, scale_divisor, scale_dtype, c)
        better = err < best
        best.copy_(torch.where(better, err, best))
        clip.copy_(torch.where(better, c, clip))

    for i in range(1, COARSE_STEPS + 1):
        consider(torch.tensor(1.0 - step * i, dtype=torch.float32))
    for h in (step / 2, step / 4):
        centre = clip.clone()
        for c in (centre - h, centre + h):
            consider(c.clamp(lo, 1.0))
    return clip, best, rtn


def search_clip(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_divisor: str,
                scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best clip factor per group for w [N, K].

    Returns (clip [N, G] float32, squared error with that clip [N, G], round-to-nearest squared error [N, G]).
    """
    wg, _ = pad_to_groups(w.to(torch.float32), group_size)  # [N, G, g]
    N, G, g = wg.shape
    limit = MAX_CHUNK_ELEMENTS if wg.device.type == "cpu" else MAX_CHUNK_ELEMENTS_ACCELERATOR
    rows = max(1, limit // (G * g))
    parts = [_search_chunk(wg[r:r + rows], bits, symmetric, scale_divisor, scale_dtype) for r in range(0, N, rows)]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]
