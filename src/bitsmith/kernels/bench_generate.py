"""End-to-end decode speed of a Llama-shaped model: fp16 weights versus bitsmith-packed ones, one harness for all.

    bitsmith bench generate --shape 1b --shape 8b --batch 1 --batch 16 --variant fp16 --variant w4 --variant w8

For each shape (Llama-3.2-1B or Llama-3-8B layer shapes) and variant, a model with random weights is built on the
GPU (speed does not depend on the values): `fp16` keeps every Linear as it is; `w4` / `w8` replace every decoder
Linear (not the head) by a `PackedLinear` of the gwint format (int4 with fp16 scales per 128 inputs / int8 with one
scale per output row) holding random codes, exactly what `bitsmith compress finequant-w4 / int8` would store.
Decoding uses a static KV cache: after a prefill of `--prompt` tokens, one decode step (forward of one token per
sequence, greedy next token written back into the input buffer) is captured into a CUDA graph and replayed
`--steps` times; tokens/s = batch x steps / time. The same code path runs every variant, so the ratio is the
weights' doing. Without CUDA (a smoke test on the CPU) the steps run eagerly, and tiny shapes are available.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

SHAPES = {  # (hidden, MLP, layers, heads, KV heads, vocab)
    "tiny": (64, 128, 2, 4, 2, 256),
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}
VARIANTS = {"fp16": None, "w4": (4, 128), "w8": (8, None)}  # (bits, group size; None = one group per row)


def build_model(shape: str, device: torch.device, dtype: torch.dtype = torch.float16):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in fp16 on the device: no float32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def pack_linears(model, bits: int, group_size: int | None, seed: int = 0) -> int:
    """Replace every decoder Linear by a gwint PackedLinear with random codes and scales; returns bytes stored."""
    from ..compress.formats import get_format
    from .modules import PackedLinear

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    stored = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                N, K = lin.weight.shape
                entry = {"format": "gwint", "format_version": 1, "in_features": K, "out_features": N, "bits": bits,
                         "group_size": group_size or K, "symmetric": True}
                dev, dtype = lin.weight.device, lin.weight.dtype
                packed = PackedLinear(entry, dtype, bias=False, device=dev)
                for suffix, (shape, dt) in get_format("gwint").tensor_specs(packed.params, dtype).items():
                    buf = getattr(packed, suffix)
                    if dt == torch.int32:
                        buf.copy_(torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device=dev, dtype=torch.int32))
                    else:  # scales: a weight of about 0.02 at the largest code
                        buf.copy_(torch.rand(shape, generator=gen, device=dev).mul_(0.01).add_(0.01)
                                  .div_(2 ** (bits - 1)).to(dt))
                    stored += buf.numel() * buf.element_size()
                setattr(parent, name, packed)
                del lin
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return stored


@torch.no_grad()
def decode_tokens_per_s(model, batch: int, steps: int, prompt: int = 16, graphs: bool = True) -> dict:
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen, device=device)
    pos = torch.arange(prompt, device=device)
    logits = model(input_ids=ids, cache_position=pos, past_key_values=cache, use_cache=True).logits  # prefill
    step_ids = logits[:, -1:].argmax(-1)  # [batch, 1]
    step_pos = torch.tensor([prompt], device=device)

    def step() -> None:
        out = model(input_ids=step_ids, cache_position=step_pos, past_key_values=cache, use_cache=True).logits
        step_ids.copy_(out[:, -1:].argmax(-1))
        step_pos.add_(1)

    use_graph = graphs and device.type == "cuda"
    if use_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: kernel compilation and tuning happen outside the capture
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
        step_pos.fill_(prompt)  # restart positions: the warm-up and capture wrote nothing the replays depend on
        graph.replay()
        torch.cuda.synchronize()
        run = graph.replay
    else:
        step()
        run = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    seconds = time.perf_counter() - t0
    return {"batch": batch, "steps": steps, "seconds": round(seconds, 4), "graphs": use_graph,
            "tokens_per_s": round(batch * steps / seconds, 1), "ms_per_step": round(1e3 * seconds / steps, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bitsmith bench generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES))
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    ap.add_argument("--batch", action="append", type=int)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--no-graphs", action="store_true", help="time eager steps (no CUDA graph)")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for shape in args.shape or ["1b", "8b"]:
        for variant in args.variant or ["fp16", "w4", "w8"]:
            model = build_model(shape, device)
            stored = None
            if VARIANTS[variant] is not None:
                stored = pack_linears(model, *VARIANTS[variant])
            for batch in args.batch or [1, 16]:
                try:
                    res = decode_tokens_per_s(model, batch, args.steps, args.prompt, graphs=not args.no_graphs)
                except Exception as e:  # one failing row must not hide the others
                    res = {"batch": batch, "error": f"{type(e).__name__}: {e}"[:500]}
                row = {"shape": shape, "variant": variant, "decoder_linear_bytes": stored, **res,
                       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = {(r["shape"], r["batch"]): r.get("tokens_per_s") for r in rows if r["variant"] == "fp16"}
    for r in rows:
        b = base.get((r["shape"], r["batch"]))
        if b and r.get("tokens_per_s"):
            r["speedup_vs_fp16"] = round(r["tokens_per_s"] / b, 2)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(json.dumps([{k: r.get(k) for k in ("shape", "variant", "batch", "tokens_per_s", "speedup_vs_fp16")}
                      for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
