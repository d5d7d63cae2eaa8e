"""Llama decoder layers whose norms, SiLU-multiply and residual adds run inside their Linears (`bench generate
--fuse-layer`).

After `bench_generate.fuse_projections` (q/k/v and gate/up as one Linear each), `fuse_decoder_layers(model)` makes
every decoder layer compute

    h   = x + o(attention(qkv(RMSNorm_in(x))))             qkv: the norm in its prologue; o: + x in its epilogue
    out = h + down(SiLU(gate(n)) * up(n)), n = RMSNorm_post(h)   gate/up: norm in, SiLU-multiply out; down: + h

with `fused_ops.fused_linear`: one deep-GEMV launch per Linear for one fp16 row through a gwint PackedLinear
(4 launches a layer and nothing between them but the attention's own ops), the same ops unfused for an
nn.Linear (the fp16 baseline: the compiler fuses them around cuBLAS as it would the stock layer). The gate/up
weight rows are interleaved (gate_0, up_0, ...) so that a GEMV program owns both halves of its SiLU-multiply;
this happens here, before packing, on the float weights. Same function as the stock layer, up to rounding.
"""

from __future__ import annotations

import torch

from .fused_ops import fused_linear, interleave_rows


def _forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
             position_embeddings=None, **kwargs):
    attn, mlp, ln = self.self_attn, self.mlp, self.post_attention_layernorm
    # the attention's own o_proj is an Identity now: a = attention output before the o projection, [..., H]
    a, _ = attn(hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
                **kwargs)
    h = fused_linear(a, attn.o_linear, residual=hidden_states)
    act = fused_linear(h, mlp.gate_up_proj.linear, norm=(ln.weight, ln.variance_epsilon), glu=True)  # [..., I]
    return fused_linear(act, mlp.down_proj, residual=h)


_CLASSES: dict[type, type] = {}


def fuse_decoder_layers(model) -> None:
    """Rewire every decoder layer of a Llama-like model (after `fuse_projections`) as the module docstring says."""
    def fused(m) -> bool:  # by name: under `python -m bench_generate` its classes live in __main__, not the package
        return type(m).__name__ == "FusedProjections" and hasattr(m, "linear") and hasattr(m, "sizes")

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = getattr(attn, "qkv_proj", None), getattr(mlp, "gate_up_proj", None)
        if not fused(qkv) or not fused(gate_up):
            raise ValueError("fuse_decoder_layers needs fused q/k/v and gate/up projections (fuse_projections)")
        if not isinstance(gate_up.linear, torch.nn.Linear):
            raise ValueError("fuse_decoder_layers must run before packing (it reorders the gate/up weight rows)")
        ln_in = layer.input_layernorm
        qkv.norm = (ln_in.weight, ln_in.variance_epsilon)
        layer.input_layernorm = torch.nn.Identity()  # unused by _forward; a stock forward would now skip it
        attn.o_linear = attn.o_proj
        attn.o_proj = torch.nn.Identity()
        n = gate_up.sizes[0]
        with torch.no_grad():
            w = gate_up.linear.weight
            w.copy_(interleave_rows(w[:n].clone(), w[n:].clone()))  # [2n, K]: gate_0, up_0, gate_1, ...
        gate_up.interleaved = True
        cls = type(layer)
        if cls not in _CLASSES.values():
            _CLASSES.setdefault(cls, type("Fused" + cls.__name__, (cls,), {"forward": _forward}))
            layer.__class__ = _CLASSES[cls]
