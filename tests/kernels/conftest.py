"""Shared by the kernel tests: the Triton interpreter switch, where the kernels run, and the error measure.

Importing this (pytest does, before the test modules) defaults TRITON_INTERPRET to 1, so the Triton kernels run on
the CPU under the interpreter; with a GPU and TRITON_INTERPRET=0 the same tests run the compiled kernels. Test
modules import what they need: `from tests.kernels.conftest import DEVICE, needs_kernels, rel_error`.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETING
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(not ON_GPU and not INTERPRETING, reason="needs a GPU or TRITON_INTERPRET=1")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of `out` against `ref` (in float64); NaN or Inf in `out` (e.g. unwritten outputs)
    fails the test."""
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
