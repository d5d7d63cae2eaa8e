"""`recover`: a short distillation of a compressed model toward the original one, its zeros held fixed (a model pass).

The student is the model as the earlier passes left it (pruned, reshaped...); the teacher is the input checkpoint
(or `teacher:`, a model folder), loaded once more. On calibration text (`text`, sampled like every calibration in
bitsmith: `samples` windows of `seq_len` tokens, seeded), each step minimizes KL(teacher || student) of the
next-token distributions at every position (temperature `temperature`, scaled by T^2), averaged over `batch_size`
sequences that go through the model `micro_batch` at a time (gradient accumulation: the memory of one step is that of
a micro-batch's logits, which matters with large vocabularies). AdamW, `lr` with a linear warm-up over the first 5%
of the steps and a cosine decay to 10%, gradients clipped to norm 1.

`lr_scale: rms` makes `lr` relative: each tensor's peak rate is `lr` times the RMS of its nonzero weights at the
start (`rates.py` says why: Adam's step does not scale with the weights, and models' weight scales differ ~10x).

Only the weights of the targeted modules (default: every Linear but the output head) train; everything else is
frozen. Every exact zero of a trained weight at the start stays zero: the masks are re-applied after each optimizer
step, so block-sparse masks survive (and a dense weight, which has no zeros, trains freely). Training runs in float32
(the weights return to their dtype at the end) through `accelerate` (device placement; `accelerate launch` for
several processes). The loss at the start and at the end goes to the log and to `ctx.extra["recover.report"]`.

`gg_prior` > 0 adds a generalized-Gaussian prior on the trained weights (DeepShape's recovery): each weight tensor's
GG(mu, nu, beta) is fitted (moment matching) at the start, and every step adds
gg_prior * mean over tensors of mean_i ((|w_i - mu| + eps) / beta)^nu, eps = 1e-3 * beta — the tensor's GG negative
log-likelihood up to constants, which holds the weights to the shape the earlier passes gave them (`gg_shape` sets
one nu for every tensor instead). Off (0) by default: the pass then trains exactly as without the option.

The teacher's forward is about a quarter of a step's arithmetic (one forward against the student's forward and
backward). `teacher_cache_gb` > 0 keeps the teacher's float32 logits of each calibration sequence (up to that many
GB) and reuses them when the sequence comes back (`samples` < steps x batch_size): the loss is unchanged, only the
repeated teacher forwards go. `TeacherLogits` is the cache; a caller distilling several students toward the same
teacher on the same sequences (benchmarks) passes one to `recover_model` and pays the teacher once.

`teacher_topk` = k > 0 distills on the teacher's k most likely words per position only: the teacher's top-k
logits (and word ids) of each sequence are computed once and kept (k x 8 bytes per token, `TeacherTopK`), and the
student's logits are computed for those k words alone, from its final hidden state and the rows of its output head
(the head is never run over the whole vocabulary, and the teacher never twice on a sequence). The loss is the KL
between the two distributions renormalized over the k words. For a large vocabulary this removes most of a step's
arithmetic (Gemma-3's 262k-word head is about 60 % of its weights' flops); it ignores how the student spreads the
mass outside the teacher's top k, and the report gives the teacher's mean mass inside them (`topk_mass`).
Measured (docs/results/blocksparse.md): that blind spot costs more than the saved arithmetic buys. On SmolLM2-135M
(16x16 block-sparse 50 %, 20 steps from the same start) k = 128 (teacher mass inside 0.91) gave perplexity 185.5
against 138.5 with the full KL, so it is off by default.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field, model_validator

from ..compress import calibration
from ..compress.errors import RecipeError
from ..compress.passes import PassKind, register_pass
from .block_sparse import CalibrationFields, resolve_tokenizer, targeted_linears
from .rates import RateScale, peak_rates

REPORT_KEY = "recover.report"


class Recover(CalibrationFields):
    """Distill the model toward the original (teacher logits), keeping every zero of the trained weights."""

    type: Literal["recover"] = "recover"
    steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(5e-5, gt=0.0, description="peak learning rate (AdamW); with lr_scale: rms, a fraction of each"
                                                " tensor's RMS")
    lr_scale: RateScale = Field(
        "absolute", description="absolute: every tensor's peak rate is lr; rms: lr times the RMS of the tensor's"
                                " nonzero weights at the start (Adam moves a weight by about the rate per step"
                                " whatever its size, so a model with small weights needs a smaller rate)")
    samples: int = Field(256, ge=1, description="calibration sequences drawn (cycled when steps need more)")
    micro_batch: int = Field(1, ge=1, description="sequences per forward/backward (gradient accumulation)")
    temperature: float = Field(1.0, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    teacher: Optional[str] = Field(None, description="teacher model folder; default: the input checkpoint")
    gg_prior: float = Field(0.0, ge=0.0, description="weight of the generalized-Gaussian prior term (0: off)")
    gg_shape: Optional[float] = Field(None, gt=0.0, le=10.0, description="gg_prior: the prior's shape nu for every"
                                                                         " tensor; default: each tensor's fitted nu")
    teacher_cache_gb: float = Field(0.0, ge=0.0, description="keep up to this many GB of teacher logits (float32)"
                                                             " for sequences seen again (0: off)")
    teacher_topk: int = Field(0, ge=0, description="k > 0: distill on the teacher's top-k words per position only"
                                                   " (student head run on those k words; 0: full vocabulary)")

    kind: ClassVar[PassKind] = PassKind.MODEL

    @model_validator(mode="after")
    def _topk(self):
        if self.teacher_topk and self.teacher_cache_gb:
            raise ValueError("teacher_topk keeps the teacher's top-k logits of every sequence itself; set"
                             " teacher_cache_gb: 0 with it")
        return self


def plan_recover(cfg: Recover, view, inventory) -> None:
    calibration.check_text_source(cfg.text, cfg.type)
    if cfg.teacher is not None and not (Path(cfg.teacher).expanduser() / "config.json").is_file():
        raise RecipeError(f"recover: teacher {cfg.teacher!r} is not a model folder (no config.json)")
    if cfg.micro_batch > cfg.batch_size:
        raise RecipeError(f"recover: micro_batch ({cfg.micro_batch}) must not exceed batch_size ({cfg.batch_size})")


def load_teacher(cfg: Recover, ctx, device) -> torch.nn.Module:
    from ..compress.checkpoint import CheckpointReader
    from ..compress.sources import CheckpointSource, materialize

    path = cfg.teacher or (getattr(ctx, "input_path", None) if ctx is not None else None)
    if path is None:
        raise RecipeError("recover: no teacher: run it through `bitsmith compress` (the input checkpoint is the"
                          " teacher) or set `teacher:` to the original model's folder")
    source = CheckpointSource(CheckpointReader(Path(path).expanduser()))
    if source.view.packed_modules:
        raise RecipeError(f"recover: the teacher {path} holds packed weights; give an unpacked original model")
    return materialize(source, device)


class TeacherLogits:
    """The teacher's float32 logits per calibration sequence, computed on first use and kept while under `max_bytes`.

    Keys are the sequences' indexes in the token batch [S, L]; each entry also keeps its token ids, and a lookup
    with other ids under the same key is an error (a cache shared between runs must see the same batches)."""

    def __init__(self, teacher: torch.nn.Module, max_bytes: float = float("inf")):
        self.teacher = teacher
        self.max_bytes = max_bytes
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (ids [L], logits [L, V] on CPU)
        self.bytes = 0
        self.forwards = 0  # sequences the teacher ran on
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """Logits [B, L, V] (float32, on ids' device) of the token ids [B, L] whose sequence indexes are `keys`."""
        for k, row in zip(keys, ids):
            if k in self.store and not torch.equal(self.store[k][0], row.cpu()):
                raise ValueError(f"TeacherLogits: sequence {k} has other tokens than when it was cached")
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        fresh = {}
        if todo:
            t = time.time()
            out = self.teacher(input_ids=ids[todo], use_cache=False).logits.float()
            self.seconds += time.time() - t
            self.forwards += len(todo)
            for i, logits in zip(todo, out):
                fresh[i] = logits
                if self.bytes + logits.numel() * 4 <= self.max_bytes:
                    self.store[keys[i]] = (ids[i].cpu(), logits.cpu())
                    self.bytes += logits.numel() * 4
        rows = [fresh[i] if i in fresh else self.store[k][1].to(ids.device) for i, k in enumerate(keys)]
        return torch.stack(rows)


class TeacherTopK:
    """The teacher's top-k logits and word ids per calibration sequence, computed on first use and always kept
    (k x 8 bytes per token). Same keys and checks as `TeacherLogits`; `mass` sums the teacher's probability inside
    the top k over the positions seen (for the report)."""

    def __init__(self, teacher: torch.nn.Module, k: int, temperature: float = 1.0):
        self.teacher, self.k, self.temperature = teacher, k, temperature
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # key -> (ids, idx, values)
        self.forwards = 0
        self.seconds = 0.0
        self.mass_sum = 0.0
        self.positions = 0

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(word ids [B, L, k] int64, logits [B, L, k] float32) on ids' device, for token ids [B, L]."""
        for k, row in zip(keys, ids):
            if k in self.store and not torch.equal(self.store[k][0], row.cpu()):
                raise ValueError(f"TeacherTopK: sequence {k} has other tokens than when it was cached")
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        if todo:
            t = time.time()
            logits = self.teacher(input_ids=ids[todo], use_cache=False).logits.float()  # [b, L, V]
            vals, idx = logits.topk(min(self.k, logits.shape[-1]), dim=-1)
            p = torch.softmax(logits / self.temperature, dim=-1)
            self.mass_sum += float(p.gather(-1, idx).sum())
            self.positions += idx.shape[0] * idx.shape[1]
            del logits, p
            self.seconds += time.time() - t
            self.forwards += len(todo)
            for i, v, j in zip(todo, vals, idx):
                self.store[keys[i]] = (ids[i].cpu(), j.to(torch.int32).cpu(), v.cpu())
        idx = torch.stack([self.store[k][1] for k in keys]).to(ids.device, torch.int64)
        vals = torch.stack([self.store[k][2] for k in keys]).to(ids.device)
        return idx, vals


def head_of(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor, float | None]:
    """(the decoder stack returning the final hidden state, the output head's weight [V, H], its logit soft cap)
    of a Hugging Face causal LM, for `teacher_topk`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model or getattr(head, "bias", None) is not None:
        raise RecipeError(f"recover: teacher_topk needs a causal LM with a bias-free output head over a base model;"
                          f" {type(model).__name__} has none: use teacher_topk: 0")
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return base, head.weight, cap


def topk_student_logits(base: torch.nn.Module, weight: torch.Tensor, cap: float | None, ids: torch.Tensor,
                        idx: torch.Tensor) -> torch.Tensor:
    """The student's logits [B, L, k] of the words idx [B, L, k] for tokens ids [B, L]: final hidden state h [B, L, H]
    times the head rows weight[idx] [B, L, k, H] (soft cap applied as the model does)."""
    h = base(input_ids=ids, use_cache=False).last_hidden_state
    logits = torch.einsum("blh,blkh->blk", h, weight[idx].to(h.dtype))
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def tensor_rates(params: dict[str, torch.Tensor], cfg: Recover) -> dict[str, float]:
    """Each trained tensor's peak learning rate: `cfg.lr`, or with lr_scale rms `cfg.lr` x RMS of its nonzeros."""
    return peak_rates(params, cfg.lr, cfg.lr_scale)


def lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, round(0.05 * steps))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), times T^2 (float32)."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def distill(student: torch.nn.Module, teacher: torch.nn.Module, batches: torch.Tensor, cfg: Recover, params,
            *, progress: bool = False, log=None, teacher_cache: Optional[TeacherLogits | TeacherTopK] = None
            ) -> dict:
    """Train `params` (a {name: Parameter} of `student`) toward `teacher` on token `batches` [S, L]; zeros fixed.

    `teacher_cache`: a `TeacherLogits` of this teacher on these batches (default: one of `cfg.teacher_cache_gb`)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    dev = next(student.parameters()).device
    accelerator = Accelerator(cpu=dev.type == "cpu")
    masks = {n: (p.detach() != 0) for n, p in params.items()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    prior = (gg_prior_terms(params, cfg) or None) if cfg.gg_prior > 0 else None
    penalties = []
    peaks = tensor_rates(params, cfg)
    # one parameter group per tensor: each keeps its own peak rate under the shared schedule
    opt = torch.optim.AdamW([{"params": [p], "lr": peaks[n], "peak": peaks[n]} for n, p in params.items()],
                            lr=cfg.lr, weight_decay=cfg.weight_decay)
    student, opt = accelerator.prepare(student, opt)
    teacher.to(accelerator.device).eval()
    topk = None
    if cfg.teacher_topk:
        base, head_w, cap = head_of(accelerator.unwrap_model(student))
        if not isinstance(teacher_cache, TeacherTopK):
            teacher_cache = TeacherTopK(teacher, cfg.teacher_topk, cfg.temperature)
        topk = teacher_cache
    elif teacher_cache is None:
        teacher_cache = TeacherLogits(teacher, cfg.teacher_cache_gb * 1e9)
    forwards0, teacher_s0 = teacher_cache.forwards, teacher_cache.seconds
    student.train()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    order = torch.randperm(batches.shape[0], generator=g)
    losses = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="recover", disable=not progress, leave=False)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.steps, group["peak"])
            idx = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % batches.shape[0]
            keys = order[idx]
            batch = batches[keys]
            total = 0.0
            for mb, mkeys in zip(batch.split(cfg.micro_batch), keys.split(cfg.micro_batch)):
                ids = mb.to(accelerator.device)
                if topk is not None:  # the teacher's top-k words, the student's logits on those alone
                    words, t_logits = topk(ids, mkeys.tolist())
                    s_logits = topk_student_logits(base, head_w, cap, ids, words)
                else:
                    t_logits = teacher_cache(ids, mkeys.tolist())
                    s_logits = student(input_ids=ids, use_cache=False).logits
                loss = kl_loss(s_logits, t_logits, cfg.temperature) * (mb.shape[0] / batch.shape[0])
                accelerator.backward(loss)
                total += loss.item()
                del t_logits, s_logits, loss
            if prior is not None:
                pen = gg_penalty(params, prior) * cfg.gg_prior
                accelerator.backward(pen)
                penalties.append(pen.item())
            accelerator.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n, p in params.items():
                    p.mul_(masks[n])
            losses.append(total)
            bar.set_postfix(kl=f"{total:.4f}", refresh=False)
    finally:
        bar.close()
        for p in params.values():
            p.requires_grad_(False)
        student.eval()
    k = max(1, len(losses) // 10)
    report = {"steps": cfg.steps, "kl_first": sum(losses[:k]) / k, "kl_last": sum(losses[-k:]) / k,
              "seconds": round(time.time() - t0, 1), "s_per_step": round((time.time() - t0) / cfg.steps, 2),
              "tokens": cfg.steps * cfg.batch_size * batches.shape[1],
              "peak_lr_min": min(peaks.values(), default=cfg.lr), "peak_lr_max": max(peaks.values(), default=cfg.lr),
              "teacher_forwards": teacher_cache.forwards - forwards0,
              "teacher_s": round(teacher_cache.seconds - teacher_s0, 1)}
    if topk is not None:
        report["teacher_topk"] = topk.k
        report["topk_mass"] = round(topk.mass_sum / max(1, topk.positions), 4)
    if penalties:
        report["gg_penalty_first"] = sum(penalties[:k]) / k
        report["gg_penalty_last"] = sum(penalties[-k:]) / k
    if log is not None:
        log(f"recover: {cfg.steps} steps, KL {report['kl_first']:.4f} -> {report['kl_last']:.4f}"
            + (f" (over the teacher's top {topk.k} words, mean mass {report['topk_mass']:.3f})" if topk else "")
            + (f", peak rates {report['peak_lr_min']:.2e}..{report['peak_lr_max']:.2e}" if cfg.lr_scale == "rms"
               else "")
            + f" ({report['s_per_step']} s/step)")
    return report


def gg_prior_terms(params, cfg: Recover) -> dict[str, tuple[float, float, float]]:
    """{name: (mu, nu, beta)}: each trained tensor's GG fit at the start (nu replaced by gg_shape when set)."""
    from .distribution import fit_gg

    out = {}
    for n, p in params.items():
        fit = fit_gg(p.detach(), skip_zeros=True)
        if fit is not None:
            out[n] = (fit.mu, cfg.gg_shape if cfg.gg_shape is not None else fit.nu, fit.beta)
    return out


def gg_penalty(params, prior: dict[str, tuple[float, float, float]]) -> torch.Tensor:
    """Mean over tensors of mean_i ((|w_i - mu| + eps) / beta)^nu (eps = 1e-3 beta keeps the gradient finite)."""
    terms = []
    for n, (mu, nu, beta) in prior.items():
        w = params[n]
        terms.append((((w - mu).abs() + 1e-3 * beta) / beta).pow(nu).mean())
    return torch.stack(terms).mean()


def recover_model(model: torch.nn.Module, cfg: Recover, teacher: torch.nn.Module, tokenizer, *,
                  progress: bool = False, log=None, where: str = "recover",
                  teacher_cache: Optional[TeacherLogits | TeacherTopK] = None) -> dict:
    """Distill `model` in place toward `teacher` as `cfg` says (float32 training); returns the report.

    `teacher_cache`: a `TeacherLogits` of `teacher` shared with other calls on the same calibration settings."""
    modules = targeted_linears(model, cfg, where)
    params = {f"{n}.weight": m.weight for n, m in modules.items()}
    batches = calibration.calibration_batches(cfg.text, tokenizer, cfg.samples, cfg.seq_len, cfg.seed,
                                              text_field=cfg.text_field, split=cfg.split, where=where)
    dtype = next(model.parameters()).dtype
    teacher_dtype = next(teacher.parameters()).dtype
    model.to(torch.float32)
    teacher.to(torch.float32)
    try:
        return distill(model, teacher, batches, cfg, params, progress=progress, log=log, teacher_cache=teacher_cache)
    finally:
        model.to(dtype)
        teacher.to(teacher_dtype)


def apply_recover(cfg: Recover, model: torch.nn.Module, ctx) -> None:
    device = getattr(ctx, "device", None) or next(model.parameters()).device
    tokenizer = resolve_tokenizer(cfg, model, ctx, "recover")
    teacher = load_teacher(cfg, ctx, device)
    report = recover_model(model, cfg, teacher, tokenizer, progress=bool(getattr(ctx, "progress", False)),
                           log=ctx.log if ctx is not None else None)
    del teacher
    if ctx is not None:
        ctx.extra.setdefault(REPORT_KEY, []).append(report)


register_pass(Recover, apply=apply_recover, plan=plan_recover)
