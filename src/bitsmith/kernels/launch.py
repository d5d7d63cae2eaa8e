"""Small pieces every packed-format kernel file needs: the launcher prologue, the grouped tile order, a format
class made of module functions, and CUDA-graph replay timing.

    rows = flat_rows(x, K, N)          # x [..., K] -> rows.x2 [M, K] (unit stride along K), rows.out [M, N]
    if rows.M == 0:
        return rows.result()           # out reshaped back to [..., N]
    ...launch on rows.x2 / rows.out...
    return rows.result()

Inside a kernel, `grouped_pid(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)` maps a 1D program id to (pid_m, pid_n) so that
GROUP_M consecutive tile rows share their weight tiles in L2 (a @triton.jit helper: it is inlined, and runs under
TRITON_INTERPRET=1 like the kernels that call it).

No pydantic here (kernels/ stays importable on the GPU machine without it).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from ..compress.formats import PackedFormat, register_format

try:  # Triton is optional at import time
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# --------------------------------------------------------------------------------------------------------------
# launcher prologue


@dataclass
class FlatRows:
    """The 2D view a launcher works on. x2: [M, K], unit stride along K; out: [M, N], empty, x's dtype."""

    x2: torch.Tensor
    out: torch.Tensor
    lead: torch.Size  # x's leading dims: the result is out viewed as [*lead, N]

    @property
    def M(self) -> int:
        return self.x2.shape[0]

    def result(self) -> torch.Tensor:
        """out as [..., N] (x's leading dims)."""
        return self.out.reshape(*self.lead, self.out.shape[1])


def flat_rows(x: torch.Tensor, K: int, N: int) -> FlatRows:
    """x [..., K] -> rows of K features (copied only when the last dim is strided) and an empty [M, N] output.

    Raises ValueError when x's last dim is not K (a reshape alone would silently regroup the features).
    """
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    return FlatRows(x2, out, x.shape[:-1])


# --------------------------------------------------------------------------------------------------------------
# grouped program order (inside kernels)

if triton is not None:

    @triton.jit
    def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """1D program id -> (pid_m, pid_n), column-major within bands of GROUP_M tile rows (the last band may be
        shorter): consecutive programs walk down a band, so a weight tile [BLOCK_N] is reused by GROUP_M
        programs while it is still in L2."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % rows
        pid_n = (pid % in_group) // rows
        return pid_m, pid_n


def grouped_pid_reference(pid: int, M: int, N: int, block_m: int, block_n: int, group_m: int) -> tuple[int, int]:
    """`grouped_pid` in Python (tests, and for reading the order)."""
    num_m, num_n = -(-M // block_m), -(-N // block_n)
    in_group = group_m * num_n
    first_m = (pid // in_group) * group_m
    rows = min(num_m - first_m, group_m)
    return first_m + (pid % in_group) % rows, (pid % in_group) // rows


# --------------------------------------------------------------------------------------------------------------
# a format made of module functions


def function_format(name: str, version: int, doc: str, *, tensor_specs: Callable, dequantize: Callable,
                    linear: Callable, check_params: Callable | None = None,
                    loadable_versions: tuple[int, ...] = (1,)) -> type[PackedFormat]:
    """Define and register a PackedFormat whose methods are the given functions, taking the method arguments
    without `self`: tensor_specs(params, dtype), dequantize(tensors, params), linear(x, tensors, params, bias),
    check_params(params) (default: no check). Returns the class (registered under `name`)."""
    attrs = {"__doc__": doc, "__module__": getattr(linear, "__module__", __name__), "name": name,
             "version": version, "loadable_versions": tuple(loadable_versions),
             "tensor_specs": staticmethod(tensor_specs), "dequantize": staticmethod(dequantize),
             "linear": staticmethod(linear)}
    if check_params is not None:
        attrs["check_params"] = staticmethod(check_params)
    cls = type(f"{name.capitalize()}Format", (PackedFormat,), attrs)
    return register_format(cls)


# --------------------------------------------------------------------------------------------------------------
# timing


def replay_times_ms(graph: "torch.cuda.CUDAGraph", replays: int) -> list[float]:
    """Milliseconds of each of `replays` replays of a captured CUDA graph (after one untimed replay)."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def median_replay_ms(graph: "torch.cuda.CUDAGraph", replays: int) -> float:
    return statistics.median(replay_times_ms(graph, replays))
