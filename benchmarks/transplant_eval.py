"""Tokenizer transplantation on a real base/donor pair: OMP against the mean, zero and subword baselines.

For one direction (the base model gets the donor's tokenizer), this script
1. cuts the same held-out excerpts from the given texts for every row (FILE:START, START in characters, snapped to
   line starts, `--chars` long), so that bits per character compare across tokenizers;
2. runs `transplant_tokenizer` with each method (a folder per method under --out; an existing finished folder is
   reused, so an interrupted run can go on);
3. scores the base model and every transplanted folder with `bitsmith.compress.evaluate.evaluate_path` (bits per
   character of the whole excerpt, window --window, non-overlapping) and writes a greedy sample of each;
4. shows how a line with numbers tokenizes with the base's and with the donor's tokenizer;
5. writes --out/results.json and prints a markdown table.

`fidelity` compares the screened search with exact OMP on real embeddings (residuals of sampled new tokens):

    python benchmarks/transplant_eval.py fidelity --base ~/.cache/bitsmith/examples/smollm2-135m \
        --donor ~/.cache/bitsmith/examples/gemma3-270m

`phases`: CPU time per target of each part of the screened search on real embeddings (C steps and torch steps):

    python benchmarks/transplant_eval.py phases --base ~/.cache/bitsmith/examples/smollm2-135m \
        --donor ~/.cache/bitsmith/examples/gemma3-270m --targets 512

`speed` times OMP alone on random embeddings of given shapes (for a GPU machine the models cannot travel to), or
on the real embeddings (--real):

    python benchmarks/transplant_eval.py speed --case smol-gets-gemma:46145:215891:640 --candidates 256,all

    python benchmarks/transplant_eval.py --base ~/.cache/bitsmith/examples/smollm2-135m \
        --donor ~/.cache/bitsmith/examples/gemma3-270m --out /tmp/tp/smol-gets-gemma \
        --text /work/shared/data/austen/northangerabbey.txt:200000 --text /work/shared/data/kjv_bible.txt:2000000
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
import sys
import time
from pathlib import Path

DIGITS = "In 1811 she paid £3,250.75 for 12 acres; by 2024 the 7th edition sold 1,000,000 copies."
PROMPTS = ("It is a truth universally acknowledged, that", "And God said,")


def excerpt(spec: str, chars: int) -> tuple[str, str]:
    path, _, start = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "0")
    text = Path(path).read_text(encoding="utf-8")
    s = int(start)
    s = text.find("\n", s) + 1 if s else 0  # start at a line start
    cut = text[s:s + chars]
    end = cut.rfind("\n")
    cut = cut[:end + 1] if end > 0 else cut
    return f"{Path(path).stem}@{s}", cut


def generate(folder: Path, prompts, bos: bool | None = None) -> list[str]:
    """Greedy continuations (24 tokens); bos=True puts the tokenizer's BOS token first even if it adds none,
    bos=False leaves it out even if it adds one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        x = tok(p, return_tensors="pt")
        if bos and x["input_ids"][0, 0] != tok.bos_token_id:
            x = {k: torch.cat([torch.full_like(v[:, :1], tok.bos_token_id if k == "input_ids" else 1), v], 1)
                 for k, v in x.items()}
        if bos is False and x["input_ids"][0, 0] == tok.bos_token_id:
            x = {k: v[:, 1:] for k, v in x.items()}
        with torch.no_grad():
            y = model.generate(**x, max_new_tokens=24, do_sample=False)
        out.append(tok.decode(y[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def tokens_of(folder: Path, text: str) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [tok.decode([i]) for i in ids]


def speed(argv: list[str]) -> int:
    """`speed`: time batched OMP on random embeddings of given shapes (the real pair's models cannot travel to a GPU
    machine, their shapes can). Imports omp.py by file path, so it runs where only torch is installed."""
    import importlib.util

    import torch

    ap = argparse.ArgumentParser(prog="transplant_eval.py speed")
    ap.add_argument("--case", action="append", default=[],
                    help="NAME:ATOMS:TARGETS:DIM (random embeddings), e.g. smol-gets-gemma:46145:215891:640")
    ap.add_argument("--real", action="append", default=[],
                    help="NAME:BASE_DIR:DONOR_DIR[:TARGETS]: the donor's real embeddings (shared tokens as atoms, "
                         "TARGETS new tokens sampled with --seed, all when left out); needs bitsmith installed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--candidates", default="256,all", help="comma list of ints and/or 'all'")
    ap.add_argument("--batch-size", default="256", help="comma list")
    ap.add_argument("--device", default=None)
    ap.add_argument("--omp-file", type=Path,
                    help="time this omp.py instead of bitsmith's (e.g. an older version, `git show REV:PATH`)")
    ap.add_argument("--no-native", action="store_true", help="CPU: the torch steps, not the C steps")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    omp_mod = None
    if args.omp_file is None:
        try:
            from bitsmith.tokenizers import omp as omp_mod
        except ImportError:  # a GPU machine without bitsmith: omp.py alone, by path
            args.omp_file = Path(__file__).resolve().parents[1] / "src/bitsmith/tokenizers/omp.py"
    if omp_mod is None:
        spec = importlib.util.spec_from_file_location("bitsmith_omp", args.omp_file)
        omp_mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(omp_mod)
    device = torch.device(args.device) if args.device else omp_mod.default_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, k {args.k}, threads {torch.get_num_threads()}, "
          f"omp {args.omp_file or omp_mod.__file__}", flush=True)
    problems = []
    for case in args.case:
        label, n, m, d = case.split(":")
        g = torch.Generator().manual_seed(0)
        problems.append((label, lambda n=int(n), m=int(m), d=int(d), g=g: (torch.randn(n, d, generator=g),
                                                                             torch.randn(m, d, generator=g))))
    for spec_ in args.real:
        parts = spec_.split(":")
        label, base, donor = parts[:3]
        m = int(parts[3]) if len(parts) > 3 else 0
        problems.append((label, lambda b=Path(base), dn=Path(donor), m=m: _real_problem(b, dn, m, args.seed)))
    out = []
    for label, make in problems:
        atoms, targets = make()
        n, d = atoms.shape
        m = len(targets)
        for cand in args.candidates.split(","):
            c = None if cand == "all" else int(cand)
            for bs in map(int, args.batch_size.split(",")):
                kw = {} if args.omp_file else {"use_native": not args.no_native}
                if not args.no_warmup:
                    omp_mod.omp(atoms, targets[:bs], args.k, candidates=c, batch_size=bs, device=device, **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                load = os.getloadavg()[0]
                t0, c0 = time.perf_counter(), time.process_time()
                res = omp_mod.omp(atoms, targets, args.k, candidates=c, batch_size=bs, device=device, **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                sec, cpu = time.perf_counter() - t0, time.process_time() - c0
                row = {"case": label, "atoms": n, "targets": m, "dim": d, "k": args.k, "candidates": cand,
                       "batch_size": bs, "seconds": round(sec, 2), "targets_per_s": round(m / sec, 1),
                       "cpu_seconds": round(cpu, 2), "targets_per_cpu_s": round(m / cpu, 1),
                       "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1),
                       "residual_mean": round(float(res.residual.mean()), 4), "device": name,
                       "steps": "given omp.py" if args.omp_file else
                       ("torch" if args.no_native or device.type != "cpu" or omp_mod.omp_native is None
                        or not omp_mod.omp_native.available() else "C")}
                out.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(out, indent=2))
    return 0


def phases(argv: list[str]) -> int:
    """`phases`: CPU milliseconds per target of each part of the screened search on real embeddings (re-ranking
    GEMM, top-M, the steps between re-rankings, coefficients, residual), for the C steps and the torch steps."""
    import torch

    from bitsmith.tokenizers import omp as O

    ap = argparse.ArgumentParser(prog="transplant_eval.py phases")
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--donor", required=True, type=Path)
    ap.add_argument("--targets", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--candidates", type=int, default=256)
    args = ap.parse_args(argv)
    A, Y = _real_problem(args.base, args.donor, args.targets, args.seed)
    sq = (A * A).sum(1)
    norm, inv, Ab = sq.sqrt(), sq.rsqrt(), A.to(torch.bfloat16)
    b, M, k = len(Y), args.candidates, args.k
    native = O.omp_native.available()
    for use_native in ([True, False] if native else [False]):
        f = O._Factor(Y, k, 1e-5)
        ms: dict[str, float] = {}
        clock = time.process_time

        def tick(name, t0):
            ms[name] = ms.get(name, 0.0) + (clock() - t0) * 1e3 / b
            return clock()

        bounds = sorted(O.refresh_steps(k) | {k})
        load = os.getloadavg()[0]
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            t0 = clock()
            S = f.R.to(torch.bfloat16) @ Ab.T
            t0 = tick("re-ranking GEMM", t0)
            if use_native:
                cand = torch.empty(b, M, dtype=torch.int64)
                O.omp_native.top_candidates(0, b, S, inv, f.idx, r0, cand)
            else:
                score = S.float().abs_().mul_(inv)
                if r0:
                    score.scatter_(1, f.idx[:, :r0], -1.0)
                cand = score.topk(M, dim=1, sorted=False).indices.sort(1)[0]
            t0 = tick("top-M", t0)
            if use_native:
                O.omp_native.segment(0, b, r0, r1, A, Ab, norm, sq, inv, cand, f, O._DEPENDENT)
            else:
                saved = torch.get_num_threads()
                torch.set_num_threads(1)
                for lo in range(0, b, O._CPU_SUB_BATCH):
                    sl = slice(lo, lo + O._CPU_SUB_BATCH)
                    O._segment(A, sq, norm, inv, Ab, f.group(sl), cand[sl], r0, r1)
                torch.set_num_threads(saved)
            tick("steps", t0)
        t0 = clock()
        x = f.coefs(k, k)
        t0 = tick("coefficients", t0)
        res = O._residual(A, Y, f.idx, x)
        tick("residual", t0)
        row = {"path": "C" if use_native else "torch", "targets": b, "load": round(load, 1),
               **{n: round(v, 3) for n, v in ms.items()}, "total": round(sum(ms.values()), 3),
               "residual_mean": round(float(res.mean()), 4)}
        print(json.dumps(row), flush=True)
    return 0


def _real_problem(base: Path, donor: Path, m: int, seed: int, embedding: str = "model.embed_tokens.weight"):
    """Atoms: the donor's embedding rows of the tokens both vocabularies have (not special); targets: the rows of m
    of the donor's other tokens (a seeded sample; all when m is 0)."""
    import torch

    from bitsmith.compress.checkpoint import CheckpointReader
    from bitsmith.tokenizers.vocab import load_vocab, tokenizer_files

    bv = load_vocab(tokenizer_files(base), json.loads((base / "config.json").read_text()), "base")
    dv = load_vocab(tokenizer_files(donor), json.loads((donor / "config.json").read_text()), "donor")
    bidx = bv.index()
    atoms: dict[int, int] = {}
    for i, key in enumerate(dv.keys):
        if key is not None and key in bidx and not dv.is_special_key(key):
            atoms.setdefault(bidx[key], i)
    atom_ids = torch.tensor(sorted(atoms.values()))
    new_ids = torch.tensor([i for i, key in enumerate(dv.keys) if key is not None and key not in bidx])
    D = CheckpointReader(donor).get(embedding).float()
    if m:
        new_ids = new_ids[torch.randperm(len(new_ids), generator=torch.Generator().manual_seed(seed))[:m]]
    return D[atom_ids].contiguous(), D[new_ids].contiguous()


def fidelity(argv: list[str]) -> int:
    """`fidelity`: how close the screened search comes to exact OMP on real embeddings: the relative residual
    ||y - A_S x|| / ||y|| of a random sample of the donor's new tokens, for the exact search, the screened search at
    several M (re-ranking at steps 0, 2, 6, 14, 30, 62), and ranking once (against y only)."""
    import torch

    from bitsmith.compress.checkpoint import CheckpointReader
    from bitsmith.tokenizers import omp as O
    from bitsmith.tokenizers.vocab import load_vocab, tokenizer_files

    ap = argparse.ArgumentParser(prog="transplant_eval.py fidelity")
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--donor", required=True, type=Path)
    ap.add_argument("--embedding", default="model.embed_tokens.weight")
    ap.add_argument("--targets", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--candidates", default="128,256,1024")
    ap.add_argument("--schedules", default="", help="other re-ranking steps to try at M=256, e.g. '0,4,16;0,8,32'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--native", choices=("both", "on", "off"), default="both",
                    help="screened rows with the C steps, the torch steps, or both (the C steps need a C compiler)")
    ap.add_argument("--no-exact", action="store_true", help="leave out the exact search and the ranked-once row")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    base = load_vocab(tokenizer_files(args.base), json.loads((args.base / "config.json").read_text()), "base")
    donor = load_vocab(tokenizer_files(args.donor), json.loads((args.donor / "config.json").read_text()), "donor")
    bidx = base.index()
    atoms = {}
    for i, key in enumerate(donor.keys):
        if key is not None and key in bidx and not donor.is_special_key(key):
            atoms.setdefault(bidx[key], i)
    atom_ids = torch.tensor(sorted(atoms.values()))
    new_ids = torch.tensor([i for i, key in enumerate(donor.keys) if key is not None and key not in bidx])
    D = CheckpointReader(args.donor).get(args.embedding).float()
    sample = new_ids[torch.randperm(len(new_ids), generator=torch.Generator().manual_seed(args.seed))[:args.targets]]
    A, Y = D[atom_ids], D[sample]
    Ab, inv = A.to(torch.bfloat16), (A * A).sum(1).rsqrt()
    print(f"{len(atom_ids)} atoms, {len(new_ids)} new tokens, {len(sample)} sampled, k {args.k}", flush=True)
    rows, got = [], {}

    def run(label, fn):
        t0 = time.perf_counter()
        idx, x = fn()
        sec = time.perf_counter() - t0
        res = float(O._residual(A, Y, idx, x).mean())
        rows.append({"search": label, "residual_mean": round(res, 4), "ms_per_target": round(1e3 * sec / len(Y), 1)})
        got[label] = (idx, x)
        print(json.dumps(rows[-1]), flush=True)

    sq = (A * A).sum(1)
    norm = sq.sqrt()
    native = O.omp_native is not None and O.omp_native.available() and args.native != "off"
    pool = ThreadPoolExecutor(torch.get_num_threads()) if torch.get_num_threads() > 1 else None

    def screened(m, steps, use_native):
        return O._omp_screened(A, sq, norm, inv, Ab, Y, args.k, m, 1e-5, steps, pool, use_native)

    if not args.no_exact:
        run("exact", lambda: O._omp_exact(A, sq, norm, inv, Y, args.k, 1e-5))
    variants = [(False, "")] if args.native == "off" or not native else [(True, " (C steps)")] \
        if args.native == "on" else [(False, " (torch steps)"), (True, " (C steps)")]
    for m in map(int, args.candidates.split(",")):
        for use_native, tag in variants:
            run(f"screened M={m}{tag}", lambda: screened(m, O.refresh_steps(args.k), use_native))
    for sched in filter(None, args.schedules.split(";")):
        steps = frozenset(int(x) for x in sched.split(","))
        run(f"screened M=256, re-ranked at {sched}", lambda: screened(256, steps, native))
    if not args.no_exact:
        m = max(map(int, args.candidates.split(",")))
        run(f"ranked once M={m}", lambda: screened(m, frozenset({0}), native))
    for m in map(int, args.candidates.split(",")):  # the C steps against the torch steps: same atoms?
        a, b = got.get(f"screened M={m} (C steps)"), got.get(f"screened M={m} (torch steps)")
        if a and b:
            same = (a[0] == b[0]).all(1)
            rows.append({"search": f"M={m}: C steps vs torch steps", "same_atoms_in_order": round(float(
                same.float().mean()), 4), "same_atom_sets": round(sum(
                    set(p.tolist()) == set(q.tolist()) for p, q in zip(a[0], b[0])) / len(Y), 4),
                "max_coef_diff_where_same": float((a[1] - b[1]).abs()[same].max()) if bool(same.any()) else None})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "speed":
        return speed(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "fidelity":
        return fidelity(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "phases":
        return phases(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--donor", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--text", action="append", required=True, help="FILE[:START_CHAR]; give two or more")
    ap.add_argument("--chars", type=int, default=12000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--methods", default="omp,mean,zero,subword")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--candidates", default="256", help="an int, or 'all' for the exact search")
    ap.add_argument("--omp-label", default="omp", help="folder/row name of the omp run (to compare settings)")
    ap.add_argument("--no-base", action="store_true", help="do not score the base model (another run of this script "
                    "with another --out does)")
    ap.add_argument("--bos-rows", choices=("on", "off"),
                    help="also score each transplanted folder with BOS forced on (rows '<method>+bos': a donor "
                         "tokenizer that adds no BOS, a base trained with one) or off (rows '<method>-bos')")
    args = ap.parse_args()

    import bitsmith
    from bitsmith.compress.evaluate import evaluate_path
    from bitsmith.compress.recipe import parse_recipe

    args.out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for spec in args.text:
        name, body = excerpt(spec, args.chars)
        p = args.out / "texts" / f"{name}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(body, encoding="utf-8")
        texts[name] = p
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update({"base": args.base.name, "donor": args.donor.name, "chars": args.chars, "window": args.window,
                    "texts": {n: str(p.name) for n, p in texts.items()}})
    rows = results.setdefault("rows", {})
    folders = {} if args.no_base else {"base": args.base}
    candidates = None if args.candidates == "all" else int(args.candidates)
    for method in args.methods.split(","):
        label = args.omp_label if method == "omp" else method
        folder = args.out / label
        folders[label] = folder
        if not (folder / "transplant_report.json").exists():
            kw = {"donor": str(args.donor), "method": method}
            if method == "omp":
                kw.update(k=args.k, candidates=candidates)
            body = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in kw.items())
            recipe = parse_recipe(f"version: 1\npasses:\n  - type: transplant_tokenizer\n{body}\n")
            t0 = time.time()
            bitsmith.compress(recipe, args.base, folder, progress=True)
            rows.setdefault(label, {})["compress_seconds"] = round(time.time() - t0, 1)
            print(f"{label}: compressed in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        report = json.loads((folder / "transplant_report.json").read_text())
        rows.setdefault(label, {})["report"] = {k: v for k, v in report.items() if k not in ("special", "tensors")}
        results_path.write_text(json.dumps(results, indent=2))
    runs = [(label, folder, None) for label, folder in folders.items()]
    if args.bos_rows:
        on = args.bos_rows == "on"
        runs += [(f"{label}{'+' if on else '-'}bos", folder, on) for label, folder in folders.items()
                 if label != "base"]
    for label, folder, bos in runs:
        row = rows.setdefault(label, {})
        for name, path in texts.items():
            if name in row.get("eval", {}):
                continue
            r = evaluate_path(folder, path, max_tokens=None, window=args.window, progress=False, bos=bos)
            row.setdefault("eval", {})[name] = {k: r[k] for k in ("bits_per_char", "ppl", "tokens", "chars",
                                                                  "seconds")}
            print(f"{label} {name}: {r['bits_per_char']:.4f} bits/char ({r['tokens']} tokens)", file=sys.stderr,
                  flush=True)
            results_path.write_text(json.dumps(results, indent=2))
        if "samples" not in row:
            row["samples"] = dict(zip(PROMPTS, generate(folder, PROMPTS, bos)))
            results_path.write_text(json.dumps(results, indent=2))
    results["digits"] = {"text": DIGITS, "base_tokenizer": tokens_of(args.base, DIGITS),
                         "donor_tokenizer": tokens_of(args.donor, DIGITS)}
    results_path.write_text(json.dumps(results, indent=2))

    names = list(texts)
    print(f"\n{args.base.name} with {args.donor.name}'s tokenizer; bits per character, {args.chars} characters each,"
          f" window {args.window}\n")
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, _, _ in runs:
        ev = rows[label]["eval"]
        print(f"| {label} | " + " | ".join(f"{ev[n]['bits_per_char']:.4f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
