import torch

from bitsmith.kernels import gwint
from bitsmith.kernels.modules import PackedLinear
from bitsmith.quant.groupwise import quantize_groupwise


def _packed(seed):
    torch.manual_seed(seed)
    w = torch.randn(24, 40)
    codes, scales, _ = quantize_groupwise(w, 4, 16, True, "pow2_minus_1", torch.float32)
    return {"qweight": gwint.pack_codes(codes, 4), "scales": scales}


def test_cpu_weight_cache_follows_buffer_changes(monkeypatch):
    entry = {"format": "gwint", "format_version": 1, "in_features": 40, "out_features": 24, "bits": 4,
             "group_size": 16, "symmetric": True}
    m = PackedLinear(entry, torch.float32)
    m.load_state_dict(_packed(0))
    x = torch.randn(3, 40)
    y0 = m(x)
    monkeypatch.setenv("BITSMITH_CPU_WEIGHT_CACHE", "0")
    assert torch.allclose(m(x), y0, atol=1e-6)  # cache on and off agree
    monkeypatch.delenv("BITSMITH_CPU_WEIGHT_CACHE")
    m.load_state_dict(_packed(1))  # new packed values in place: the cached weight must not be reused
    ref = torch.nn.functional.linear(x, gwint.dequantize(m.qweight, m.scales, None, 4, 16, 40))
    assert torch.allclose(m(x), ref, atol=1e-6) and not torch.allclose(m(x), y0)
