"""Block-sparse pruning (`block_sparse`, a model pass) and BSR packing (`pack_bsr`, a tensor pass).

`block_sparse` zeroes whole R x C blocks (R output rows by C input columns of W [out, in]) of the targeted Linear
weights. Scores (`bitsmith.prune.scores`): `magnitude` (weights only) or `activation` (|W| times the input norms on
calibration text, Wanda-style, summed per block as output energy). Allocation: per `layer`, per block `row`, or
`global` (one threshold over all layers, each layer's sparsity bounded by min/max_sparsity). `refit: true` re-solves
the kept weights of every output row by ridge least squares on the calibration inputs (mask fixed).

`sequential: true` prunes the decoder layers one after another (SparseGPT's order): each layer's statistics (input
norms, Gram matrices) are collected on the inputs that the already pruned (and refitted) earlier layers produce,
through the layer runner of `bitsmith.quant.gptq` (`run_layers`: one layer in float32 at a time, plus the hidden
states of the calibration set), so a layer's scores and refit see the errors of the layers before it. Allocation is
per matrix (`layer` or `row`); `global` needs every layer's scores at once and is refused with it. Targeted
modules outside the decoder layers are pruned last, on statistics from a forward of the pruned model. One process
only (refused under ranks). `reconstruct_epochs` > 0 (sequential only) then trains each pruned layer's kept weights
(Adam, `reconstruct_lr`, zeros kept) so that the layer maps the pruned model's hidden states to the dense model's
output of that layer (the dense model's hidden states are carried alongside, one more copy of the calibration
set's): block-wise distillation, which also corrects the error the earlier layers left, at one layer's
forward/backward per calibration batch and epoch.

`allocation: owl` (activation scores, scope layer or row, one-shot or sequential) prunes the decoder layers
unevenly at the same average: each layer's sparsity is `sparsity` +- `owl_lambda`, lower for the layers whose
importances |W|*||X|| on the dense model hold more outliers (above `owl_m` times the layer's mean), as OWL does
(`bitsmith.prune.owl`: the rule, and the rounding to whole blocks that keeps the average). The sequential form
collects the dense model's input norms in one extra forward first. The report's "owl" entry lists every layer's
outlier ratio and sparsity.

Its kind follows the config: with `score: magnitude`, no refit and a per-layer or per-row allocation it needs
nothing but each weight, so it is a tensor pass (streamed one weight at a time, like the quantizers: checkpoints
bigger than memory, `--workers`, ranks); activation scores, refit or a global threshold need the whole model, so it
is then a model pass. The pruned blocks are exact zeros in the model's weights, so later
passes see them: `recover` keeps them zero, `finequant` keeps them zero (symmetric codes have an exact zero), and
`pack_bsr` stores only the nonzero blocks. The block shape of every pruned module is recorded in the run's context
(`ctx.extra["block_sparse"]`) for `pack_bsr` with `block: auto`.

    passes:
      - {type: block_sparse, sparsity: 0.5, block: [16, 16], score: activation, refit: true, text: calib.txt}
      - {type: recover, steps: 100, text: calib.txt}
      - {type: finequant, bits: 4, group_size: 128}      # optional: int4 values
      - {type: pack_bsr}                                   # -> format bsr (values dense, or int4/int8 from gwint)
"""

from __future__ import annotations

import contextlib
import time
from typing import ClassVar, Literal, Union

import torch
from pydantic import Field, field_validator, model_validator

from ..compress import calibration, parallel
from ..compress.errors import PlanError, RecipeError
from ..compress.formats import PackedTensor
from ..compress.inventory import inventory_from_model, select
from ..compress.passes import PassKind, TargetedPass, TensorState, register_pass
from ..kernels import bsr
from . import owl
from . import scores as S
from .rates import RateScale, peak_rates

EXTRA_KEY = "block_sparse"  # ctx.extra[EXTRA_KEY][module] = {"block": (R, C), "sparsity": s}
REPORT_KEY = "block_sparse.report"


def _block_field(v):
    if isinstance(v, str):
        parts = v.lower().replace(" ", "").split("x")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return (int(parts[0]), int(parts[1]))
        return v
    return v


def _block_checked(v, handler):
    """The `block` field of block_sparse and pack_bsr: "16x16" or [16, 16] (or pack_bsr's "auto"), sides >= 1."""
    v = handler(_block_field(v))
    if v != "auto" and (v[0] < 1 or v[1] < 1):
        raise ValueError(f"block sides must be positive integers, got {list(v)}")
    return v


class CalibrationFields(calibration.CalibrationSettings, TargetedPass):
    """Calibration text settings shared by the model passes of this package, as top-level keys of the pass
    (defined once in `bitsmith.compress.calibration.CalibrationSettings`)."""


class BlockSparse(CalibrationFields):
    """Zero the lowest-scored R x C blocks of the targeted Linear weights."""

    type: Literal["block_sparse"] = "block_sparse"
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of the targeted weights set to zero")
    block: tuple[int, int] = Field((16, 16), description="[rows, cols] of W [out_features, in_features]")
    score: Literal["magnitude", "activation"] = "activation"
    scope: Literal["layer", "row", "global"] = "layer"
    min_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="scope global: least sparsity of any layer")
    max_sparsity: float = Field(0.98, gt=0.0, le=1.0, description="scope global: most sparsity of any layer")
    refit: bool = Field(False, description="re-solve the kept weights by least squares on calibration inputs")
    ridge: float = Field(0.01, ge=0.0, description="refit: ridge, relative to the mean diagonal of X^T X")
    refit_iters: int = Field(25, ge=0, description="refit: conjugate-gradient steps; 0 = exact (slow for thin blocks)")
    sequential: bool = Field(False, description="prune decoder layer by layer, each on the inputs that the pruned"
                                                " earlier layers produce (activation scores or refit; scope layer/row)")
    reconstruct_epochs: int = Field(0, ge=0, description="sequential: after pruning a decoder layer, train its kept"
                                                       " weights this many passes over the calibration set toward"
                                                       " the dense model's layer output (0: off)")
    reconstruct_lr: float = Field(1e-4, gt=0.0, description="reconstruct: Adam learning rate")
    reconstruct_lr_scale: RateScale = Field("absolute", description="reconstruct: absolute (every tensor at"
                                            " reconstruct_lr) or rms (reconstruct_lr times the RMS of the tensor's"
                                            " kept weights; see prune/rates.py)")
    allocation: Literal["uniform", "owl"] = Field("uniform", description="per-layer sparsity: uniform (every matrix"
                                                  " at `sparsity`) or owl (decoder layers with more activation"
                                                  " outliers pruned less, same average; scope layer or row)")
    owl_lambda: float = Field(0.08, gt=0.0, lt=0.5, description="owl: layer sparsities span sparsity +- this")
    owl_m: float = Field(5.0, gt=1.0, description="owl: an importance |W|*||X|| above owl_m times its layer's mean"
                                                  " counts as an outlier")

    @property
    def supports_ranks(self) -> bool:
        """As a model pass under torchrun it shares its work (same bytes as 1 rank); the sequential form does not."""
        return not self.sequential

    @property
    def kind(self) -> PassKind:  # type: ignore[override]
        return PassKind.MODEL if self.needs_calibration or self.scope == "global" else PassKind.TENSOR

    @field_validator("block", mode="wrap")
    @classmethod
    def _block(cls, v, handler):
        return _block_checked(v, handler)

    @model_validator(mode="after")
    def _bounds(self):
        if self.scope == "global" and not self.min_sparsity <= self.sparsity <= self.max_sparsity:
            raise ValueError(f"sparsity {self.sparsity} must lie within [min_sparsity {self.min_sparsity},"
                             f" max_sparsity {self.max_sparsity}]")
        if self.sequential and self.scope == "global":
            raise ValueError("sequential: true allocates per matrix, layer after layer; scope global needs every"
                             " layer's scores at once: use scope layer or row, or sequential: false")
        if self.reconstruct_epochs and not self.sequential:
            raise ValueError("reconstruct_epochs needs sequential: true (it trains each layer on the inputs that the"
                             " pruned earlier layers produce)")
        if self.allocation == "owl":
            if self.score != "activation":
                raise ValueError("allocation owl counts outliers of the activation-aware importances |W|*||X||: it"
                                 " needs score: activation")
            if self.scope == "global":
                raise ValueError("allocation owl sets one sparsity per decoder layer; scope global sets them by one"
                                 " threshold: use scope layer or row with owl, or allocation uniform")
            if not (0.0 < self.sparsity - self.owl_lambda and self.sparsity + self.owl_lambda < 1.0):
                raise ValueError(f"allocation owl: sparsity {self.sparsity} +- owl_lambda {self.owl_lambda} must lie"
                                 " inside (0, 1)")
        if self.sequential and not self.needs_calibration:
            raise ValueError("sequential: true needs calibration statistics: score activation or refit: true"
                             " (magnitude scores without refit do not depend on the earlier layers)")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.score == "activation" or self.refit


# --------------------------------------------------------------------------------------------------------- plan

def _check_divisible(cfg, modules, where: str) -> None:
    R, C = cfg.block
    bad = [f"{m.name} {list(m.shape)}" for m in modules
           if m.shape is None or len(m.shape) != 2 or m.shape[0] % R or m.shape[1] % C]
    if bad:
        raise PlanError(f"{where}: block {R}x{C} does not tile {len(bad)} targeted weights (out % {R}, in % {C}):"
                        f" {', '.join(bad[:6])}; choose a block that divides them or add them to `ignore`")


def plan_block_sparse(cfg: BlockSparse, view_or_chosen, inventory=None) -> dict | None:
    """Model kind: (cfg, view, inventory) -> None. Tensor kind: (cfg, chosen modules) -> {module: skip reason}."""
    where = f"{cfg.type}"
    if inventory is None:  # tensor kind: the engine selected the targets
        _check_divisible(cfg, view_or_chosen, where)
        return {}
    chosen, _ = select(inventory, cfg.targets, cfg.ignore, where)
    if not chosen:
        raise PlanError(f"{where}: no module to prune (every match is ignored or tied)")
    _check_divisible(cfg, chosen, where)
    if cfg.needs_calibration:
        calibration.check_text_source(cfg.text, where)


# -------------------------------------------------------------------------------------------------------- apply

def targeted_linears(model: torch.nn.Module, cfg, where: str) -> dict[str, torch.nn.Module]:
    chosen, _ = select(inventory_from_model(model), cfg.targets, cfg.ignore, where)
    named = dict(model.named_modules())
    return {m.name: named[m.name] for m in chosen}


def resolve_tokenizer(cfg, model, ctx, where: str):
    path = cfg.tokenizer or (getattr(ctx, "input_path", None) if ctx is not None else None)
    if path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        from pathlib import Path

        if name and Path(name).is_dir():
            path = name
    return calibration.load_tokenizer(path, where)


def calibrate(model, cfg: CalibrationFields, names, tokenizer, *, gram=False, device=None, progress=False,
              desc="calibration", distributed=False):
    """Sample the calibration tokens of `cfg` and collect input statistics of `names` (`distributed`: see
    `calibration.collect_stats`)."""
    batches = calibration.calibration_batches(cfg.text, tokenizer, cfg.samples, cfg.seq_len, cfg.seed,
                                              text_field=cfg.text_field, split=cfg.split, where=desc)
    return calibration.collect_stats(model, names, batches, batch_size=cfg.batch_size, gram=gram, device=device,
                                     progress=progress, desc=desc, distributed=distributed)


@torch.no_grad()
def prune_model(model: torch.nn.Module, cfg: BlockSparse, *, tokenizer=None, stats=None, progress: bool = False,
                log=None, where: str = "block_sparse", measure: bool | None = None, distributed: bool = False
                ) -> dict:
    """Prune `model` in place as `cfg` says; returns a report (per-module sparsity, output errors, seconds).

    `stats` ({module: LinearStats} from `calibration.collect_stats` on the dense model, with Gram matrices when
    refitting) can be passed in to reuse one calibration for several prunings; otherwise it is collected here.
    `measure`: compute each matrix's relative output error on the calibration inputs (needs Gram matrices; one
    [N, K] x [K, K] product per matrix); default: when refitting.
    `distributed`: under a torch.distributed group of more than one rank (every rank calls this on the same
    model): calibration batches are shared (`collect_stats`), rank 0 scores and allocates and broadcasts the
    masks, the refits are shared by Gram matrix (group g on rank g % world, its Gram sent there by rank 0) and
    their weights broadcast, so every rank ends with the model and report of a one-process run, bitwise.
    """
    t0 = time.time()
    modules = targeted_linears(model, cfg, where)
    R, C = cfg.block
    bad = [f"{n} {list(m.weight.shape)}" for n, m in modules.items()
           if m.weight.dim() != 2 or m.weight.shape[0] % R or m.weight.shape[1] % C]
    if bad:
        raise PlanError(f"{where}: block {R}x{C} does not tile {', '.join(bad[:6])}; choose another block or"
                        " ignore them")
    ranks = parallel.active_world() if distributed else None
    if cfg.sequential:
        if ranks is not None:
            raise PlanError(f"{where}: sequential: true runs in one process (each layer waits for the ones before"
                            " it); run it without torchrun, or use sequential: false")
        if stats is not None:
            raise RecipeError(f"{where}: sequential: true collects its statistics layer by layer; precomputed"
                              " `stats` cannot be used with it")
        if tokenizer is None:
            raise RecipeError(f"{where}: sequential pruning needs calibration text and a tokenizer")
        return _prune_sequential(model, cfg, modules, tokenizer, progress=progress, log=log, where=where,
                                 measure=cfg.refit if measure is None else measure, t0=t0)
    rank, world = ranks or (0, 1)
    if cfg.needs_calibration and stats is None:
        if tokenizer is None:
            raise RecipeError(f"{where}: score {cfg.score!r}{' with refit' if cfg.refit else ''} needs calibration"
                              " text and a tokenizer")
        stats = calibrate(model, cfg, list(modules), tokenizer, gram=cfg.refit, progress=progress, desc=where,
                          distributed=ranks is not None)
    t1 = time.time()
    masks = None
    owl_report = None
    if rank == 0:  # scores need the statistics, which only rank 0 holds
        act = cfg.score == "activation"
        scores = {n: S.block_scores(m.weight, cfg.block, stats[n].norm if act else None) for n, m in modules.items()}
        sparsity = cfg.sparsity
        if cfg.allocation == "owl":
            sparsity, owl_report = _owl_plan(cfg, model, modules, {n: stats[n].norm for n in modules}, where, log)
        masks = S.allocate(scores, sparsity, cfg.scope, min_sparsity=cfg.min_sparsity,
                           max_sparsity=cfg.max_sparsity)
    if ranks is not None:
        masks = _broadcast_masks(masks, modules, cfg.block)
    measure = cfg.refit if measure is None else measure
    report = {"modules": {}, "block": list(cfg.block), "score": cfg.score, "scope": cfg.scope, "refit": cfg.refit}
    if owl_report is not None:  # rank 0's (the masks, hence the weights, are every rank's)
        report["owl"] = owl_report
    pruned = sum(int((~masks[n]).sum()) * R * C for n in modules)
    total = sum(m.weight.numel() for m in modules.values())
    shared = ranks is not None and (cfg.refit or measure)  # else every rank masks every weight itself
    if shared:
        work = [(names, gi % world, has_gram) for gi, (names, has_gram) in enumerate(_gram_groups(stats, modules))]
    else:
        work = [([n], rank, True) for n in modules]
    sends = []
    for names, dst, has_gram in work:
        if dst != rank:  # another rank computes these; rank 0 hands it their Gram matrix
            if rank == 0 and has_gram:
                sends.append(parallel.isend(stats[names[0]].gram, dst))
            continue
        if shared and rank != 0:
            K = modules[names[0]].weight.shape[1]
            gram = parallel.recv((K, K), torch.float32, 0, modules[names[0]].weight.device) if has_gram else None
        else:
            gram = stats[names[0]].gram if (stats is not None and names[0] in stats) else None
        for n in names:
            report["modules"][n] = _prune_one(modules[n].weight, masks[n], cfg, gram, measure)
        del gram
    for job, _buf in sends:
        job.wait()
    if shared:  # every rank gets every weight and every entry, in module order
        import torch.distributed as dist

        for names, dst, _ in work:
            for n in names:
                parallel.broadcast_(modules[n].weight.data, dst)
        parts: list = [None] * world
        dist.all_gather_object(parts, report["modules"])
        merged = {k: v for p in parts for k, v in p.items()}
        report["modules"] = {n: merged[n] for n in modules}
    report["sparsity"] = pruned / total if total else 0.0
    report["calibration_s"] = round(t1 - t0, 2)
    report["seconds"] = round(time.time() - t0, 2)
    if log is not None:
        log(_summary(report, cfg, where) + (f" on {world} ranks" if ranks is not None else ""))
    return report


@torch.no_grad()
def _prune_one(w: torch.Tensor, keep: torch.Tensor, cfg: BlockSparse, gram, measure: bool,
               dtype: torch.dtype | None = None) -> dict:
    """Zero the pruned blocks of `w` in place (refitting the kept weights when asked; the result rounded to `dtype`,
    default w's) and return its report entry."""
    masked = w.to(torch.float32) * S.expand(keep, cfg.block)
    entry = {"sparsity": round(S.sparsity_of(keep), 4)}
    if gram is not None and measure:
        entry["out_err"] = round(S.output_error(masked, w, gram), 6)
    if cfg.refit:
        new = S.refit_rows(w, keep, cfg.block, gram, cfg.ridge, cfg.refit_iters)
        entry["out_err_refit"] = round(S.output_error(new, w, gram), 6)
    else:
        new = masked
    w.copy_(new.to(dtype or w.dtype))
    return entry


def _summary(report: dict, cfg: BlockSparse, where: str) -> str:
    R, C = cfg.block
    sp = [e["sparsity"] for e in report["modules"].values()]
    msg = (f"{where}: {len(report['modules'])} matrices, {R}x{C} blocks, {cfg.score} scores, {cfg.scope} allocation"
           f"{', sequential' if cfg.sequential else ''}: {report['sparsity']:.1%} of their weights zeroed (per matrix"
           f" {min(sp):.1%}..{max(sp):.1%})")
    errs = [e["out_err"] for e in report["modules"].values() if "out_err" in e]
    if errs:
        msg += f"; mean relative output error {sum(errs) / len(errs):.4f}"
    refits = [e["out_err_refit"] for e in report["modules"].values() if "out_err_refit" in e]
    if refits:
        msg += f" -> {sum(refits) / len(refits):.4f} after refit"
    return msg + f"; {report['seconds']:.2f} s (calibration {report['calibration_s']:.2f} s)"


def _prune_masks(cfg: BlockSparse, mods: dict, stats: dict, measure: bool, dtype, pruned: dict,
                 sparsity: float | dict = None) -> dict:
    """Score, allocate (per matrix; `sparsity` default cfg.sparsity, or {module: sparsity}) and prune `mods` with
    their statistics; {module: report entry}, and pruned[module] = its number of zeroed weights."""
    act = cfg.score == "activation"
    scores = {n: S.block_scores(m.weight, cfg.block, stats[n].norm if act else None) for n, m in mods.items()}
    masks = S.allocate(scores, cfg.sparsity if sparsity is None else sparsity, cfg.scope)
    R, C = cfg.block
    pruned.update({n: int((~k).sum()) * R * C for n, k in masks.items()})
    return {n: _prune_one(m.weight, masks[n], cfg, stats[n].gram, measure, dtype) for n, m in mods.items()}


def _owl_plan(cfg: BlockSparse, model, modules: dict, norms: dict, where: str, log) -> tuple[dict, dict]:
    """allocation owl: ({module: sparsity}, report) from the dense model's input norms (`bitsmith.prune.owl`)."""
    from ..quant.gptq import find_layers

    stack, _ = find_layers(model)
    sparsity, report = owl.owl_sparsities({n: m.weight for n, m in modules.items()}, norms, stack, cfg.sparsity,
                                          cfg.owl_lambda, cfg.owl_m, cfg.block, cfg.scope)
    total = sum(m.weight.numel() for m in modules.values())
    report["planned_sparsity"] = sum(sparsity[n] * m.weight.numel() for n, m in modules.items()) / total
    if log is not None and report["layers"]:
        sp = [v["sparsity"] for v in report["layers"].values()]
        log(f"{where}: owl allocation (m {cfg.owl_m}, lambda {cfg.owl_lambda}): layer sparsities {min(sp):.3f}.."
            f"{max(sp):.3f} ({', '.join(f'{v:.3f}' for v in sp)}), planned average {report['planned_sparsity']:.4f}")
    return sparsity, report


@contextlib.contextmanager
def _float32_on_cpu(model, device, enabled: bool = True):
    """Run the block with the model in float32 when it computes on the CPU (`device` None means the CPU) in a lower
    precision (bf16 matmuls are slower there and round the statistics and refits), then put its dtype back, also
    on errors."""
    dtype = next(model.parameters()).dtype
    on_cpu = device is None or torch.device(device).type == "cpu"
    upcast = enabled and on_cpu and dtype != torch.float32
    if upcast:
        model.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            model.to(dtype)


@torch.no_grad()
def _prune_sequential(model, cfg: BlockSparse, modules: dict, tokenizer, *, progress, log, where, measure, t0
                      ) -> dict:
    """`sequential: true` (see the module docstring): prune_model's work, decoder layer by decoder layer."""
    from tqdm.auto import tqdm

    from ..quant.gptq import LayerStep, _Hessians, find_layers, run_layers

    tokens = calibration.calibration_batches(cfg.text, tokenizer, cfg.samples, cfg.seq_len, cfg.seed,
                                             text_field=cfg.text_field, split=cfg.split, where=where)
    device = next(model.parameters()).device
    entries: dict = {}
    counts: dict = {}
    stack_name, layers = find_layers(model)
    bar = tqdm(total=len(layers), desc=f"{where} sequential", disable=not progress, leave=False)
    stat_s = [0.0]

    dense_hidden: list = []  # reconstruct: the dense model's hidden states entering this layer, per batch
    sparsity, owl_report = cfg.sparsity, None
    if cfg.allocation == "owl":  # the layer sparsities need every layer's dense statistics before the first prune
        t = time.time()
        with _float32_on_cpu(model, device):
            dense_stats = calibrate(model, cfg, list(modules), tokenizer, gram=False, desc=where)
        sparsity, owl_report = _owl_plan(cfg, model, modules, {n: dense_stats[n].norm for n in modules}, where, log)
        del dense_stats
        stat_s[0] += time.time() - t

    def process(step) -> None:
        mods = {n: m for n, m in modules.items() if n.startswith(step.name + ".")}
        if cfg.reconstruct_epochs:
            # the dense layer's outputs on the dense model's inputs: this layer's target and the next one's input
            dense_hidden[:] = LayerStep(step.index, step.name, step.layer, step.dtype,
                                        dense_hidden or step.hidden, step.kwargs).run()
        if mods:
            t = time.time()
            hs = _Hessians(mods)  # one Gram matrix per distinct input (q/k/v, gate/up), float32
            step.run()
            hs.remove()
            stats = {n: calibration.LinearStats(hs.H[n].diagonal().to(torch.float64), gram=hs.H[n]) for n in mods}
            stat_s[0] += time.time() - t
            # rounded to the model's dtype at once, so the next layers see the weights that will be stored
            done = _prune_masks(cfg, mods, stats, measure, step.dtype, counts, sparsity)
            if cfg.reconstruct_epochs:
                rec = reconstruct_layer(step, mods, dense_hidden, cfg.reconstruct_epochs, cfg.reconstruct_lr,
                                        cfg.reconstruct_lr_scale)
                for n in mods:
                    done[n]["reconstruct"] = rec
            entries.update(done)
            if log is not None:
                errs = [e.get("out_err_refit", e.get("out_err")) for e in done.values()]
                errs = [x for x in errs if x is not None]
                log(f"{where}: layer {step.index + 1}/{len(layers)}: {len(mods)} matrices pruned"
                    + (f", mean relative output error {sum(errs) / len(errs):.4f}" if errs else "")
                    + (f", layer output error {rec['err_first']:.4f} -> {rec['err_last']:.4f} (reconstruct)"
                       if cfg.reconstruct_epochs else "")
                    + f", {time.time() - t:.1f} s")
        bar.update(1)

    run_layers(model, tokens, cfg.batch_size, device, process)
    bar.close()
    rest = {n: m for n, m in modules.items() if n not in entries}
    if rest:  # outside the decoder layers (e.g. an untied head): statistics from the pruned model's forward
        t = time.time()
        dtype = next(model.parameters()).dtype
        with _float32_on_cpu(model, device):
            stats = calibrate(model, cfg, list(rest), tokenizer, gram=True, desc=where)
            stat_s[0] += time.time() - t
            entries.update(_prune_masks(cfg, rest, stats, measure, dtype, counts, sparsity))
    pruned = sum(counts.values())
    total = sum(m.weight.numel() for m in modules.values())
    report = {"modules": {n: entries[n] for n in modules}, "block": list(cfg.block), "score": cfg.score,
              "scope": cfg.scope, "refit": cfg.refit, "sequential": True,
              "sparsity": pruned / total if total else 0.0, "calibration_s": round(stat_s[0], 2),
              "seconds": round(time.time() - t0, 2), "outside_layers": sorted(rest)}
    if owl_report is not None:
        report["owl"] = owl_report
    if log is not None:
        log(_summary(report, cfg, where) + (f"; pruned after the layers ({stack_name}): {', '.join(sorted(rest))}"
                                            if rest else ""))
    return report


def reconstruct_layer(step, mods: dict, targets: list, epochs: int, lr: float,
                      lr_scale: RateScale = "absolute") -> dict:
    """Train the pruned weights of `mods` (in `step.layer`, float32) so that the layer maps its inputs (the pruned
    model's hidden states, `step.hidden`) to `targets` (the dense model's outputs of this layer), zeros kept.

    Loss per batch: squared error relative to the targets' energy. Adam, constant `lr` (times each tensor's kept
    RMS with `lr_scale` rms), `epochs` passes over the
    batches (one step per batch). The weights are rounded to the layer's own dtype at the end (what will be stored);
    when that leaves the layer's error above where it started, the starting weights come back (`kept` False).
    Returns the relative error over the calibration set before and after."""
    from ..quant.gptq import _first

    params = [m.weight for m in mods.values()]
    masks = [p.detach() != 0 for p in params]

    def error() -> float:
        with torch.no_grad():
            num = den = 0.0
            for h, (a, k), y in zip(step.hidden, step.kwargs, targets):
                num += float(((_first(step.layer(h, *a, **k)) - y) ** 2).sum())
                den += float((y**2).sum())
        return num / den

    before = error()
    start = [p.detach().clone() for p in params]
    rates = peak_rates({str(i): p for i, p in enumerate(params)}, lr, lr_scale)
    opt = torch.optim.Adam([{"params": [p], "lr": rates[str(i)]} for i, p in enumerate(params)], lr=lr)
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        try:
            for _ in range(epochs):
                for h, (a, k), y in zip(step.hidden, step.kwargs, targets):
                    out = _first(step.layer(h, *a, **k))
                    loss = ((out - y) ** 2).sum() / (y**2).sum()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for p, m in zip(params, masks):
                            p.mul_(m)
        finally:
            for p in params:
                p.requires_grad_(False)
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(step.dtype).to(p.dtype))
    after = error()
    if after > before:  # the training overshot (too high a rate for this layer): keep the refitted weights
        with torch.no_grad():
            for p, w in zip(params, start):
                p.copy_(w)
    return {"epochs": epochs, "err_first": round(before, 6), "err_last": round(min(before, after), 6),
            "kept": after <= before}


def _broadcast_masks(masks: dict | None, modules: dict, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rank 0's block masks on every rank (one flat uint8 broadcast)."""
    R, C = block
    shapes = {n: (m.weight.shape[0] // R, m.weight.shape[1] // C) for n, m in modules.items()}
    dev = next(iter(modules.values())).weight.device
    if masks is not None:
        flat = torch.cat([masks[n].reshape(-1).to(torch.uint8) for n in modules]).to(dev)
    else:
        flat = torch.empty(sum(a * b for a, b in shapes.values()), dtype=torch.uint8, device=dev)
    parallel.broadcast_(flat, 0)
    out, i = {}, 0
    for n, (a, b) in shapes.items():
        out[n] = flat[i:i + a * b].reshape(a, b).bool()
        i += a * b
    return out


def _gram_groups(stats, modules: dict) -> list[tuple[list[str], bool]]:
    """Rank 0's modules grouped by the Gram matrix they share (q/k/v, gate/up), in module order, with whether the
    group has one; broadcast to every rank."""
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        groups: dict = {}
        for n in modules:
            g = stats[n].gram if (stats is not None and n in stats) else None
            groups.setdefault(id(g) if g is not None else ("alone", n), []).append(n)
        box[0] = [(names, stats is not None and names[0] in stats and stats[names[0]].gram is not None)
                  for names in groups.values()]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def prune_weight(cfg: BlockSparse, state: TensorState, ctx=None) -> TensorState:
    """Tensor-pass form (magnitude scores, layer/row scope): prune one weight [N, K] with the same rule as the model
    pass, so a streamed run and an in-memory one zero the same blocks."""
    w = state.tensor
    R, C = cfg.block
    if w.dim() != 2 or w.shape[0] % R or w.shape[1] % C:
        raise PlanError(f"block_sparse: block {R}x{C} does not tile {state.name} {list(w.shape)}; choose another"
                        " block or ignore it")
    scores = {state.name: S.block_scores(w, cfg.block, None)}
    keep = S.allocate(scores, cfg.sparsity, cfg.scope)[state.name]  # [N / R, K / C]
    state.tensor = (w.to(torch.float32) * S.expand(keep, cfg.block)).to(w.dtype)
    state.facts["block_sparse"] = {"block": [R, C], "sparsity": round(S.sparsity_of(keep), 4)}
    if ctx is not None and state.module is not None:
        ctx.extra.setdefault(EXTRA_KEY, {})[state.module] = {"block": (R, C), "sparsity": S.sparsity_of(keep)}
    return state


def apply_block_sparse(cfg: BlockSparse, model, ctx) -> None:
    if isinstance(model, TensorState):
        return prune_weight(cfg, model, ctx)
    where = "block_sparse"
    progress = bool(getattr(ctx, "progress", False))
    device = getattr(ctx, "device", None)
    tokenizer = resolve_tokenizer(cfg, model, ctx, where) if cfg.needs_calibration else None
    # Calibration on a CPU runs in float32; the sequential form upcasts one layer at a time itself.
    with _float32_on_cpu(model, device, enabled=cfg.needs_calibration and not cfg.sequential):
        distributed = bool(getattr(ctx, "distributed", False))  # under torchrun: every rank runs this pass
        first = not distributed or (parallel.active_world() or (0, 1))[0] == 0  # rank 0 logs
        report = prune_model(model, cfg, tokenizer=tokenizer, progress=progress and first,
                             log=ctx.log if ctx is not None and first else None, where=where,
                             distributed=distributed)
    if ctx is not None:
        rec = ctx.extra.setdefault(EXTRA_KEY, {})
        for n, e in report["modules"].items():
            rec[n] = {"block": tuple(cfg.block), "sparsity": e["sparsity"]}
        ctx.extra.setdefault(REPORT_KEY, []).append(report)


register_pass(BlockSparse, apply=apply_block_sparse, plan=plan_block_sparse)


# ---------------------------------------------------------------------------------------------------- pack_bsr

class PackBsr(TargetedPass):
    """Store the targeted weights in the `bsr` format: only their nonzero blocks (values dense, or int4/int8 when a
    `finequant` pass packed them just before)."""

    type: Literal["pack_bsr"] = "pack_bsr"
    block: Union[Literal["auto"], tuple[int, int]] = Field(
        "auto", description="[rows, cols]; auto: the block that block_sparse used on that module in this recipe")
    min_sparsity: float = Field(0.0, ge=0.0, le=1.0,
                                description="leave a weight as it is when fewer of its blocks are zero")

    kind: ClassVar[PassKind] = PassKind.TENSOR
    packs: ClassVar[bool] = True
    accepts_packed: ClassVar[bool] = True  # converts a gwint-packed weight (finequant) into quantized bsr

    @field_validator("block", mode="wrap")
    @classmethod
    def _block(cls, v, handler):
        return _block_checked(v, handler)


def plan_pack_bsr(cfg: PackBsr, modules) -> dict[str, str]:
    skipped = {}
    for m in modules:
        if m.shape is None or len(m.shape) != 2:
            skipped[m.name] = f"weight is not a matrix (shape {list(m.shape or [])})"
        elif cfg.block != "auto" and (m.shape[0] % cfg.block[0] or m.shape[1] % cfg.block[1]):
            skipped[m.name] = f"block {cfg.block[0]}x{cfg.block[1]} does not tile its {list(m.shape)} weight"
    return skipped


def _block_for(cfg: PackBsr, state: TensorState, ctx) -> tuple[int, int] | None:
    record = (getattr(ctx, "extra", None) or {}).get(EXTRA_KEY) if ctx is not None else None
    if cfg.block == "auto":
        if not record:
            raise PlanError("pack_bsr: block auto needs a block_sparse pass earlier in the same recipe (none pruned"
                            " anything in this run); set `block: [rows, cols]` to pack weights pruned before")
        hit = record.get(state.module)
        return None if hit is None else tuple(hit["block"])
    if record and state.module in record and tuple(record[state.module]["block"]) != tuple(cfg.block):
        got = record[state.module]["block"]
        raise PlanError(f"pack_bsr: block {list(cfg.block)} differs from the {list(got)} blocks block_sparse pruned"
                        f" {state.module} with; use block: auto")
    return tuple(cfg.block)


def apply_pack_bsr(cfg: PackBsr, state: TensorState, ctx=None) -> TensorState:
    block = _block_for(cfg, state, ctx)
    if block is None:
        state.facts["pack_bsr"] = {"left": "not pruned by block_sparse in this run"}
        return state
    w = state.tensor  # [N, K], the dense value (dequantized when packed)
    N, K = w.shape
    if N % block[0] or K % block[1]:
        state.facts["pack_bsr"] = {"left": f"block {block} does not tile {list(w.shape)}"}
        return state
    mask = bsr.block_mask(w, block)
    sparsity = S.sparsity_of(mask)
    if sparsity < cfg.min_sparsity:
        state.facts["pack_bsr"] = {"left": f"block sparsity {sparsity:.3f} < min_sparsity {cfg.min_sparsity}"}
        return state
    packed = state.packed
    if packed is None:
        params, tensors = bsr.pack(w, block, mask)
    elif packed.format == "gwint":
        p = packed.params
        if not p.get("symmetric", True) or p["bits"] not in (4, 8):
            raise PlanError(f"pack_bsr: {state.module} is packed as {p['bits']}-bit"
                            f" {'symmetric' if p.get('symmetric', True) else 'asymmetric'} gwint; the bsr format"
                            " takes symmetric int4 or int8 (finequant bits 4|8, symmetric: true)")
        try:
            params, tensors = bsr.from_gwint(packed.tensors["qweight"], packed.tensors["scales"], None, p["bits"],
                                             p["group_size"], K, block, mask)
        except ValueError as e:
            raise PlanError(f"pack_bsr: {state.module}: {e}") from None
    else:
        raise PlanError(f"pack_bsr: {state.module} is packed as {packed.format!r}; pack_bsr converts dense weights"
                        " or gwint (finequant) ones")
    state.packed = PackedTensor(bsr.FORMAT_NAME, params, tensors)
    state.facts["pack_bsr"] = {"block": list(block), "sparsity": round(sparsity, 4), "bits": params["bits"]}
    return state


register_pass(PackBsr, apply=apply_pack_bsr, plan=plan_pack_bsr)
