"""Clipping search: per group, the range shrink factor that minimises the squared reconstruction error.

Round-to-nearest sets each group's scale from its extreme weight, so one outlier stretches the grid for the whole
group. Shrinking the range by a factor c < 1 clips that outlier but gives every other weight a finer grid. Per group
we search c in [lowest, 1] (lowest = 0.5 for b <= 4 bits, 0.8 above): a coarse grid of 6 factors, then two
refinements around each group's best (half, then a quarter of the coarse step), 10 error evaluations in all,
resolution (1 - lowest) / 20. The scale is computed from the clipped range and rounded to its storage dtype, and the
codes follow from that scale, so the error measured is the error stored. c = 1 (plain round-to-nearest) is the
starting point and a factor must be strictly better to replace it: the search never increases any group's error.
Weights only, no calibration data.

`rule_search` (scale_divisor auto) picks, per group, one of four scale rules: max|w| / 2^(b-1) or / (2^(b-1) - 1),
each with or without the squared-error clipping search above, whichever has the least sum of |error|^4. All four are
one clip factor under the / (2^(b-1) - 1) divisor (the code range is -2^(b-1) .. 2^(b-1) - 1 for both divisors), so
the result is a clip tensor like search_clip's. A power above 2 weighs the largest errors -- clipped outliers -- more
than the squared error does, so the search's clipping is kept only where it does not cost the group's largest
weights much; by squared error the clipping search always wins, by perplexity it does not (evidence in
docs/passes/finequant.md).
"""

from __future__ import annotations

import torch

from .groupwise import divisor_for, group_codes, group_dequant, group_scales, group_sq_error, pad_to_groups

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


RULE_POWER = 4  # rule_search's error: sum of |error|^RULE_POWER per group (3 measured worse, docs/passes/finequant.md)
BASE_DIVISOR = "pow2_minus_1"  # rule_search's clip factors are relative to this divisor


def group_errors(wg: torch.Tensor, bits: int, symmetric: bool, scale_divisor: str, scale_dtype: torch.dtype,
                 clip: torch.Tensor | float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors [N, G], sum of |error|^RULE_POWER [N, G]) of quantizing wg [N, G, g] (float32)."""
    scale, zero = group_scales(wg, bits, symmetric, scale_divisor, scale_dtype, clip)
    err = group_dequant(group_codes(wg, scale, zero, bits), scale, zero, bits).sub_(wg).abs_()
    return err.square().sum(dim=-1), err.pow_(RULE_POWER).sum(dim=-1)


def _rule_chunk(wg: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    best = None
    for divisor in (BASE_DIVISOR, "pow2") if symmetric else (BASE_DIVISOR,):
        # under the base divisor, clip factor `ratio` gives this divisor's scale
        ratio = divisor_for(bits, BASE_DIVISOR) / divisor_for(bits, divisor) if symmetric else 1.0
        searched = _search_chunk(wg, bits, symmetric, divisor, scale_dtype)[0]
        for clip in (torch.full_like(searched, ratio), searched * ratio):
            e2, ep = group_errors(wg, bits, symmetric, BASE_DIVISOR, scale_dtype, clip)
            if best is None:
                best = [clip, e2, ep]
                continue
            better = ep < best[2]  # strictly better: ties keep the earlier rule (plain round-to-nearest first)
            best = [torch.where(better, new, old) for new, old in zip((clip, e2, ep), best)]
    return best[0], best[1], best[2]


def rule_search(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale_divisor auto for w [N, K]: per group, the scale rule with the least sum of |error|^RULE_POWER.

    Returns (clip [N, G] float32 to use with scale_divisor BASE_DIVISOR, squared error [N, G], that power's error
    [N, G]).
    """
    wg, _ = pad_to_groups(w.to(torch.float32), group_size)  # [N, G, g]
    N, G, g = wg.shape
    limit = MAX_CHUNK_ELEMENTS if wg.device.type == "cpu" else MAX_CHUNK_ELEMENTS_ACCELERATOR
    rows = max(1, limit // (G * g))
    parts = [_rule_chunk(wg[r:r + rows], bits, symmetric, scale_dtype) for r in range(0, N, rows)]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]
