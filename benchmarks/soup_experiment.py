"""Model soups of SmolLM2-135M fine-tunes on Jane Austen: ingredients, uniform / greedy / learned soups, and an
out-of-distribution check, all in one process (made for one GPU; `--tiny` runs the same code on a CPU in a minute).

1. Fine-tune the base model N times from the same start (each with its own learning rate, seed and data order) on
   the training novels; the ingredients stay in memory in the base dtype (bf16), as they would be written.
2. Soups through bitsmith's own soup functions (`bitsmith.merge.mixing` and `bitsmith.merge.learned`, the code the
   `soup` pass calls): uniform (mean of all), greedy (paper's rule, on the validation text), learned (per-layer
   softmax mixing fitted on the validation text).
3. Perplexity (`bitsmith.compress.evaluate.perplexity`, float32 compute, non-overlapping windows) of the base model,
   every ingredient and every soup on: the validation text (used by greedy and learned to choose: optimistic for
   them), a test text (another Austen novel, never used to choose), and an out-of-distribution text (the Bible).
4. Writes a results JSON (--out) after every phase, and prints a markdown table.

    python benchmarks/soup_experiment.py --model ~/.cache/bitsmith/examples/smollm2-135m \
        --train /work/shared/data/austen/{emma,mansfieldpark,prideprejudice,sensesensibility}.txt \
        --val /work/shared/data/austen/northangerabbey.txt --test /work/shared/data/austen/persuasion.txt \
        --ood /work/shared/data/kjv_bible.txt --out results.json

The GPU machine has no pydantic: the script imports bitsmith's soup functions without the pass registry then.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def import_soup_functions():
    """bitsmith.merge.{mixing, learned} and the perplexity function, with or without pydantic installed."""
    sys.path.insert(0, str(REPO / "src"))
    try:
        import pydantic  # noqa: F401
    except ImportError:  # `bitsmith.merge` imports the pass (pydantic); its math modules do not need it
        import bitsmith

        pkg = types.ModuleType("bitsmith.merge")
        pkg.__path__ = [str(Path(bitsmith.__file__).parent / "merge")]
        sys.modules["bitsmith.merge"] = pkg
    from bitsmith.compress.checkpoint import CheckpointReader
    from bitsmith.compress.evaluate import perplexity
    from bitsmith.merge import learned, mixing

    return mixing, learned, perplexity, CheckpointReader


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read(path: str) -> str:
    return Path(path).expanduser().read_text(encoding="utf-8")


def windows_of(tokenizer, text: str, seq: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def fine_tune(model, start, train: torch.Tensor, *, lr: float, seed: int, steps: int, batch: int,
              warmup: int, device: str, names) -> dict:
    """One ingredient: from the base weights, AdamW with linear warmup and cosine decay, bf16 autocast on CUDA."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    gen = torch.Generator().manual_seed(seed)  # the data order
    torch.manual_seed(seed)
    fused = {"fused": True} if device.startswith("cuda") else {}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, **fused)
    order, pos = torch.randperm(train.shape[0], generator=gen), 0
    losses = []
    t0 = time.time()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        if pos + batch > len(order):
            order, pos = torch.randperm(train.shape[0], generator=gen), 0
        x = train[order[pos:pos + batch]].to(device)
        pos += batch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    state = model.state_dict()
    out = {n: state[n].detach().clone() for n in names}  # float32; the caller rounds to the checkpoint dtype
    del opt
    return {"state": out, "loss_first": losses[0], "loss_last": sum(losses[-10:]) / min(10, len(losses)),
            "seconds": round(time.time() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="base model folder (the fine-tunes' common start)")
    ap.add_argument("--train", nargs="+", required=True, help="training text files")
    ap.add_argument("--val", required=True, help="validation text: greedy and learned choose on it")
    ap.add_argument("--test", required=True, help="in-distribution test text, never used to choose")
    ap.add_argument("--ood", required=True, help="out-of-distribution text")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--lrs", default="2e-5,5e-5,1e-4,1e-4,2e-4,3e-4",
                    help="one learning rate per ingredient (comma-separated); ingredient i uses seed i")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--val-tokens", type=int, default=32768)
    ap.add_argument("--test-tokens", type=int, default=65536)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--learned-steps", type=int, default=40)
    ap.add_argument("--learned-lr", type=float, default=0.05)
    ap.add_argument("--learned-batch", type=int, default=8)
    ap.add_argument("--learned-window", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run: after the first fine-tune, drop ingredients (never below 5) "
                         "whose fine-tunes would not fit in 60%% of it; said in the results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random Llama with the model's tokenizer and tiny settings: checks the code on a CPU")
    args = ap.parse_args(argv)

    mixing, learned, perplexity, CheckpointReader = import_soup_functions()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(min(torch.get_num_threads(), 16 if args.device.startswith("cuda") else 2))
    dev = args.device
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = json.loads((Path(args.model).expanduser() / "config.json").read_text())
    if args.tiny:  # same tokenizer, tiny random weights: only the code paths are real
        config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)
        torch.manual_seed(0)
        model = mixing.build_model(config, dev)
        sd = model.state_dict()
        names = [n for n, _ in model.named_parameters()]  # no weights file needed (tied weights once)
        base_state = {n: sd[n].detach().to(torch.bfloat16).clone() for n in names}
        args.steps, args.batch, args.seq, args.warmup = 6, 4, 64, 2
        args.val_tokens, args.test_tokens, args.window = 600, 600, 128
        args.learned_steps, args.learned_batch, args.learned_window = 4, 2, 64
        args.lrs = ",".join(args.lrs.split(",")[:3])
    else:
        reader = CheckpointReader(args.model)
        names = list(reader.tensors)
        base_state = {n: reader.get(n).to(dev) for n in names}
        model = mixing.build_model(config, dev)
    lrs = [float(x) for x in args.lrs.split(",")]
    dtypes = {n: base_state[n].dtype for n in names}
    mixing.load_weights(model, names, lambda n: base_state[n])  # float32 model = the base weights, exactly
    train_master = {n: p.detach().clone() for n, p in model.named_parameters()}  # every fine-tune starts here

    texts = {"val": read(args.val), "test": read(args.test), "ood": read(args.ood)}
    limits = {"val": args.val_tokens, "test": args.test_tokens, "ood": args.test_tokens}
    results: dict = {
        "settings": {k: v for k, v in vars(args).items()},
        "files": {"train": [Path(p).name for p in args.train], "val": Path(args.val).name,
                  "test": Path(args.test).name, "ood": Path(args.ood).name},
        "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
        "torch": torch.__version__, "rows": {}, "ingredients": [],
    }
    out_path = Path(args.out)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")

    def evaluate(getter, which=("val", "test", "ood")) -> dict:
        mixing.load_weights(model, names, getter)
        row = {}
        for k in which:
            r = perplexity(model, tokenizer, texts[k], max_tokens=limits[k], window=args.window, progress=False)
            row[k] = round(r["ppl"], 4)
            row[f"{k}_tokens"] = r["tokens"]
        return row

    t_start = time.time()
    results["rows"]["base"] = evaluate(lambda n: base_state[n])
    log(f"base: {results['rows']['base']}")
    save()

    train_text = "\n\n".join(read(p) for p in args.train)
    train = windows_of(tokenizer, train_text, args.seq)
    results["train_windows"] = int(train.shape[0])
    results["train_tokens"] = int(train.numel())
    log(f"train: {train.shape[0]} windows of {args.seq} tokens")
    ingredients = []
    for i, lr in enumerate(list(lrs)):
        ft = fine_tune(model, train_master, train, lr=lr, seed=i, steps=args.steps, batch=args.batch,
                       warmup=args.warmup, device=dev, names=names)
        # the fine-tune's weights, rounded to the base dtype as a checkpoint would store them
        state = {n: ft["state"][n].to(dtypes[n]) for n in names}
        ingredients.append(state)
        label = f"ft{i}"
        row = evaluate(state.get)
        results["rows"][label] = row
        results["ingredients"].append({"label": label, "lr": lr, "seed": i, "steps": args.steps,
                                       "loss_first": round(ft["loss_first"], 4),
                                       "loss_last10": round(ft["loss_last"], 4), "seconds": ft["seconds"]})
        log(f"{label} lr {lr:g} seed {i}: loss {ft['loss_first']:.3f} -> {ft['loss_last']:.3f} "
            f"({ft['seconds']} s); {row}")
        save()
        if i == 0 and args.budget_s:
            per = time.time() - t_start  # one fine-tune and two evaluations, roughly
            fit = max(5, int(0.6 * args.budget_s // per))
            if fit < len(lrs):
                results["dropped_for_time"] = lrs[fit:]
                log(f"time: {per:.0f} s per ingredient; keeping {fit} of {len(lrs)} (dropping lrs {lrs[fit:]})")
                lrs = lrs[:fit]
        if i + 1 >= len(lrs):
            break
    labels = [f"ft{i}" for i in range(len(lrs))]
    getters = [s.get for s in ingredients]

    # uniform soup
    t0 = time.time()
    uniform = {n: mixing.weighted_sum(getters, n, None, dtypes[n], labels) for n in names}
    results["rows"]["uniform soup"] = evaluate(uniform.get)
    results["rows"]["uniform soup"]["seconds"] = round(time.time() - t0, 2)
    log(f"uniform soup: {results['rows']['uniform soup']}")
    del uniform
    save()

    # greedy soup, chosen on the validation text
    t0 = time.time()
    score = mixing.perplexity_scorer(model, names, tokenizer, texts["val"], args.val_tokens, args.window)
    g = mixing.greedy_soup(getters, names, dtypes, score, labels, log=log)
    greedy = {n: g.mean(n, dtypes[n]) for n in names}
    results["greedy"] = {"order": [labels[i] for i in g.order], "chosen": [labels[i] for i in g.chosen],
                         "soup_val": g.soup_score, "decisions": g.decisions,
                         "never_worse_than_best_on_val": g.soup_score <= min(g.scores)}
    results["rows"]["greedy soup"] = evaluate(greedy.get)
    results["rows"]["greedy soup"]["seconds"] = round(time.time() - t0, 2)
    log(f"greedy soup {results['greedy']['chosen']}: {results['rows']['greedy soup']}")
    del greedy, g
    save()

    # learned soup, fitted on the validation text
    t0 = time.time()
    wins = learned.token_windows(tokenizer, texts["val"], args.learned_window, args.val_tokens)
    res = learned.fit_learned_soup(model, names, getters, wins, granularity="layer", steps=args.learned_steps,
                                   lr=args.learned_lr, batch_size=args.learned_batch, log=log)
    mix = {n: mixing.weighted_sum(getters, n, res.weights_for(n), dtypes[n], labels) for n in names}
    results["rows"]["learned soup"] = evaluate(mix.get)
    results["rows"]["learned soup"]["seconds"] = round(time.time() - t0, 2)
    mean_w = [sum(w[i] for w in res.weights.values()) / len(res.weights) for i in range(len(labels))]
    results["learned"] = {"granularity": "layer", "groups": len(res.weights), "windows": int(wins.shape[0]),
                          "loss_first": res.losses[0], "loss_last": res.losses[-1],
                          "mean_weight": dict(zip(labels, mean_w)),
                          "weights": {k: dict(zip(labels, v)) for k, v in res.weights.items()}}
    log(f"learned soup (mean weights {[round(w, 3) for w in mean_w]}): {results['rows']['learned soup']}")
    results["seconds"] = round(time.time() - t_start, 1)
    save()

    print(table(results))
    return 0


def table(results: dict) -> str:
    rows = results["rows"]
    lines = ["| model | val ppl | test ppl | OOD ppl |", "| --- | ---: | ---: | ---: |"]
    ings = {x["label"]: x for x in results.get("ingredients", [])}
    for name, r in rows.items():
        label = f"{name} (lr {ings[name]['lr']:g}, seed {ings[name]['seed']})" if name in ings else name
        lines.append(f"| {label} | {r['val']:.3f} | {r['test']:.3f} | {r['ood']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "table":  # soup_experiment.py table RESULTS.json
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        sys.exit(0)
    sys.exit(main())
