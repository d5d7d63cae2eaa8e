"""Development proxy for `group_size: auto` allocations (not the acceptance protocol: see finequant_quality.py).

    python benchmarks/finequant_alloc_dev.py --model DIR --bits 4 --text FILE --offset 200000 --tokens 4096 \
        --cache DIR --specs 32:fixed,32:C0:sse:en,32:C0:wsse:wen [--fisher-text FILE --fisher-offset 500000]
        [--out rows.jsonl]

Every targeted matrix is quantized once per candidate group size with `scale_divisor: auto` (what the pass stores;
whole matrices, not the pass's 64-row sample) and the dequantized weights are cached in --cache, so an allocation
costs one perplexity evaluation. Per matrix and group size it records the squared error (`sse`), the same with
input column k weighted by the square of the gain of the RMSNorm in front of the matrix (`wsse`: q/k/v after the
input norm, gate/up after the MLP's input norm, Gemma's 1 + w convention; o/down unweighted), the matching energies
(`en`, `wen`), and with --fisher-text a diagonal empirical Fisher-weighted error (`fisher`: squared gradients of the
loss over 2048 tokens of that text in chunks of 256; data-aware, an oracle for comparison only).

A spec is `G:fixed` (every matrix at group size G) or `G:SET:ERR:EN[:SCORE]`: bits_budget = what fixed G costs,
candidates SET (C0 = 16..128 powers of two, the default; C1 adds 24, 48, 96; C2 = C1 + 160, 192, 256; C3 = C0 +
48, 96; C4 = C3 + 160, 192, 256; C5 = C3 + 160, 192; C6 = C0 + 160; C7 = C6 + 192), error ERR and energy EN for
`adaptive.MatrixProfile`, and SCORE one of adaptive's scores (default size_relative2; use sse with ERR fisher).
The allocation is `adaptive.allocate`. The text is read from --offset characters on, so that a development text
can skip its front matter; perplexity as `bitsmith eval ppl` (window 1024, non-overlapping).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import torch
from _common import append_jsonl, log

SETS = {"C0": [16, 32, 64, 128], "C1": [16, 24, 32, 48, 64, 96, 128],
        "C2": [16, 24, 32, 48, 64, 96, 128, 160, 192, 256], "C3": [16, 32, 48, 64, 96, 128],
        "C4": [16, 32, 48, 64, 96, 128, 160, 192, 256], "C5": [16, 32, 48, 64, 96, 128, 160, 192],
        "C6": [16, 32, 64, 128, 160], "C7": [16, 32, 64, 128, 160, 192]}


def input_gains(model, names):
    """weight name -> gain of the RMSNorm in front (weights only), or None (o_proj, down_proj)."""
    params = dict(model.named_parameters())
    gemma = "gemma" in type(model).__name__.lower()
    out = {}
    for n in names:
        if any(p in n for p in ("q_proj", "k_proj", "v_proj")):
            norm = n.split(".self_attn.")[0] + ".input_layernorm.weight"
        elif any(p in n for p in ("gate_proj", "up_proj")):
            norm = n.split(".mlp.")[0] + (".pre_feedforward_layernorm.weight" if gemma
                                          else ".post_attention_layernorm.weight")
        else:
            out[n] = None
            continue
        g = params[norm].detach().float()
        out[n] = 1 + g if gemma else g
    return out


def dequantized(cache, tag, orig, bits, g):
    """{weight name: float32 weight as stored} at group size min(g, K), scale_divisor auto; cached on disk."""
    from bitsmith.quant.finequant import FineQuant, quantize_matrix

    path = Path(cache) / f"{tag}-b{bits}-g{g}.pt"
    if path.exists():
        return torch.load(path)
    t0, out = time.time(), {}
    for n, w in orig.items():
        K = w.shape[1]
        cfg = FineQuant(bits=bits, group_size=g if g < K else "channel", scale_divisor="auto")
        out[n] = quantize_matrix(w, cfg, min(g, K))[3]
    torch.save(out, path)
    log(f"  quantized {tag} b{bits} g{g} in {time.time() - t0:.1f} s")
    return out


def matrix_stats(cache, tag, model, orig, bits, sizes, fisher=None):
    from bitsmith.quant.groupwise import storage_bits

    path = Path(cache) / f"stats-{tag}-b{bits}.pkl"
    S = pickle.loads(path.read_bytes()) if path.exists() else {}
    gains = input_gains(model, orig)
    for g in sizes:
        if g in S and (fisher is None or "fisher" in next(iter(S[g].values()))):
            continue
        D = dequantized(cache, tag, orig, bits, g)
        S[g] = {}
        for n, w in orig.items():
            wf = w.float()
            e2 = (D[n] - wf).square()
            cw = gains[n].square() if gains[n] is not None else torch.ones(wf.shape[1])
            S[g][n] = dict(sse=float(e2.sum()), wsse=float((e2 * cw).sum()), en=float(wf.square().sum()),
                           wen=float((wf.square() * cw).sum()), shape=tuple(w.shape),
                           cost=storage_bits(*w.shape, bits, min(g, w.shape[1]), True))
            if fisher is not None:
                S[g][n]["fisher"] = float((fisher[n] * e2).sum())
        path.write_bytes(pickle.dumps(S))
    return S


def empirical_fisher(model, tok, text, tokens=2048, chunk=256):
    """Sum over chunks of squared loss gradients per targeted weight (data-aware; comparison only)."""
    named = dict(model.named_modules())
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    for p in model.parameters():
        p.requires_grad_(False)
    F = {}
    for n in TARGETS:
        named[n[:-7]].weight.requires_grad_(True)
        F[n] = torch.zeros_like(named[n[:-7]].weight)
    for i in range(0, ids.shape[1], chunk):
        x = ids[:, i:i + chunk]
        if tok.bos_token_id is not None:
            x = torch.cat([torch.tensor([[tok.bos_token_id]]), x], 1)
        model.zero_grad()
        model(x, labels=x).loss.backward()
        for n in TARGETS:
            F[n] += named[n[:-7]].weight.grad.square()
    for n in TARGETS:
        named[n[:-7]].weight.requires_grad_(False)
        named[n[:-7]].weight.grad = None
    return F


TARGETS: list[str] = []


def allocation(S, bits, budget_g, sizes, err, en, score):
    from bitsmith.quant import adaptive
    from bitsmith.quant.groupwise import storage_bits

    shapes = [v["shape"] for v in S[sizes[0]].values()]
    budget = sum(storage_bits(N, K, bits, min(budget_g, K), True) for N, K in shapes) / sum(N * K for N, K in shapes)
    profiles = []
    for n, s0 in S[sizes[0]].items():
        opts = [adaptive.Option(min(g, s0["shape"][1]), S[g][n]["cost"], S[g][n][err]) for g in sizes]
        profiles.append(adaptive.MatrixProfile(n, s0["shape"], s0[en], opts))
    adaptive.set_score(score)
    try:
        choice = adaptive.allocate(profiles, budget)
    finally:
        adaptive.set_score("size_relative2")
    return {n: o.group_size for n, o in choice.items()}, adaptive.allocation_bits(choice, profiles)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--text", required=True)
    ap.add_argument("--offset", type=int, default=0, help="characters of --text to skip")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--cache", required=True, help="folder for dequantized weights and statistics")
    ap.add_argument("--specs", required=True)
    ap.add_argument("--fisher-text", default=None)
    ap.add_argument("--fisher-offset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.cache, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitsmith.compress.evaluate import perplexity, read_text
    from bitsmith.quant import adaptive
    from bitsmith.quant.finequant import FineQuant

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    tag = Path(args.model).name
    named = dict(model.named_modules())
    orig = {n: named[n[:-7]].weight.detach().to(torch.bfloat16).clone()
            for n, _ in adaptive.iter_model_weights(model, FineQuant())}
    TARGETS[:] = list(orig)
    specs = [s.split(":") for s in args.specs.split(",") if s]
    sizes = sorted({int(s[0]) for s in specs if s[1] == "fixed"} | {g for s in specs if s[1] != "fixed"
                                                                    for g in SETS[s[1]]})
    fisher = None
    if any(len(s) > 2 and s[2] == "fisher" for s in specs):
        fisher = empirical_fisher(model, tok, read_text(args.fisher_text)[args.fisher_offset:args.fisher_offset + 60000])
    S = matrix_stats(args.cache, tag, model, orig, args.bits, sizes, fisher)
    text = read_text(args.text)[args.offset:]
    for s in specs:
        bg = int(s[0])
        if s[1] == "fixed":
            choice, desc = {n: bg for n in orig}, f"fixed g{bg}"
        else:
            score = s[4] if len(s) > 4 else "size_relative2"
            choice, _ = allocation(S, args.bits, bg, SETS[s[1]], s[2], s[3], score)
            desc = f"auto@g{bg} {s[1]} {s[2]} {score}"
        with torch.no_grad():
            for g in sorted(set(choice.values())):
                D = dequantized(args.cache, tag, orig, args.bits, g)
                for n in orig:
                    if choice[n] == g:
                        named[n[:-7]].weight.copy_(D[n])
        t0 = time.time()
        ppl = perplexity(model, tok, text, max_tokens=args.tokens, window=1024, progress=False)["ppl"]
        hist: dict[str, int] = {}
        for n, g in sorted(choice.items(), key=lambda kv: kv[1]):
            key = "ch" if g >= orig[n].shape[1] else str(g)
            hist[key] = hist.get(key, 0) + 1
        row = dict(model=tag, bits=args.bits, spec=s, desc=desc, ppl=ppl, text=Path(args.text).name,
                   offset=args.offset, tokens=args.tokens, hist=hist, eval_seconds=round(time.time() - t0, 1))
        print(append_jsonl(args.out, row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
