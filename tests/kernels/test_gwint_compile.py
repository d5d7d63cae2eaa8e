"""A gwint PackedLinear inside `torch.compile`: one graph (no break at the packed Linear), the Triton path through
the `bitsmith::gwint_linear` custom op, and the same numbers as the eager call (TRITON_INTERPRET=1 on the CPU)."""

import pytest
import torch

from bitsmith.kernels import gwint
from bitsmith.kernels.modules import PackedLinear
from tests.kernels.conftest import DEVICE, needs_kernels, rel_error


def _packed_linear(N, K, bits, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    entry = {"format": "gwint", "format_version": 1, "in_features": K, "out_features": N, "bits": bits,
             "group_size": group_size, "symmetric": True}
    m = PackedLinear(entry, torch.float16)
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=g)
    scales = (torch.rand(gwint.num_groups(K, group_size), N, generator=g) * 0.02 + 0.002).to(torch.float16)
    m.load_state_dict({"qweight": gwint.pack_codes(codes, bits), "scales": scales})
    return m.to(DEVICE)


class _Block(torch.nn.Module):
    """Elementwise ops on both sides of two packed Linears, as in a decoder MLP."""

    def __init__(self):
        super().__init__()
        self.up = _packed_linear(48, 72, 4, 32, seed=0)  # K = 72: a partial last group
        self.down = _packed_linear(72, 48, 8, 48, seed=1)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x * 0.5)))


@needs_kernels
@pytest.mark.parametrize("M", [1, 5])
def test_packed_linear_compiles_without_graph_breaks(monkeypatch, M):
    monkeypatch.setenv("BITSMITH_TRITON", "1")  # the Triton path on the CPU too (interpreter)
    monkeypatch.setenv("BITSMITH_CPU_WEIGHT_CACHE", "0")
    torch._dynamo.reset()
    block = _Block()
    x = torch.randn(M, 72, generator=torch.Generator().manual_seed(2)).to(torch.float16).to(DEVICE)
    eager = block(x)
    calls = []
    op = torch.ops.bitsmith.gwint_linear

    def counting_backend(gm, example_inputs):  # records the custom op in the traced graph, runs it as traced
        calls.extend(n for n in gm.graph.nodes if n.target in (op, op.default))
        return gm.forward

    compiled = torch.compile(block, backend=counting_backend, fullgraph=True)  # fullgraph: any break raises
    out = compiled(x)
    assert len(calls) == 2  # both packed Linears are single opaque ops in the one graph
    assert out.shape == eager.shape and rel_error(out.float().cpu(), eager.float().cpu()) < 1e-3
    ref = x.float() + torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(x.float() * 0.5, block.up.dequantized_weight().float())),
        block.down.dequantized_weight().float())
    assert rel_error(out.float().cpu(), ref.cpu()) < 5e-3


def test_custom_op_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 72, dtype=torch.float16)
        qw = torch.empty(9, 48, dtype=torch.int32)  # ceil(72 / 8) words of 4-bit codes, N = 48
        sc = torch.empty(3, 48, dtype=torch.float16)
        out = torch.ops.bitsmith.gwint_linear(x, qw, sc, None, 4, 32, 72, None)
    assert out.shape == (2, 3, 48) and out.dtype == torch.float16
