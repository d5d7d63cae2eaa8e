"""Calibration-aware rounding (`rounding: gptq`) for the quantizing passes: finequant, bipolar, bcq.

Round-to-nearest minimises ||W - Q|| weight by weight. What matters is the layer's output on real inputs,
||(W - Q) X||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X summed over calibration tokens. GPTQ (Frantar et al., 2022)
quantizes the columns of W one at a time and spreads each column's rounding error over the columns not yet
quantized, in proportion to the inverse Hessian (optimal brain surgeon updates), so later columns absorb it.

Per Linear W [N, K] and its H [K, K]:

1. columns whose input is always zero (H_jj = 0) are set to zero and H_jj to 1; H += damp * mean(diag H) * I
   (a larger damping is retried when the Cholesky factorization fails);
2. U = upper Cholesky factor of H^-1; columns are taken in order (or by decreasing H_jj with `act_order`) in blocks of
   `block_size`: inside a block each column is rounded on the pass's grid and its error e_j = (w_j - q_j) / U_jj is
   subtracted from the block's later columns (e_j U_j,j+1..); at the end of the block, all later columns receive the
   block's errors in one matrix product (the lazy batch update);
3. the grid is the pass's own (a `ColumnGrid`, implemented in finequant.py, bipolar.py and bcq.py): groups of
   consecutive input weights in the original column order, partial last groups included. A group's parameters
   (scale, clip, zero point; bipolar scale; BCQ alphas and offset) are fitted from the group's current,
   error-updated weights when its first column is reached. With `act_order` the order of the columns changes but not
   the groups: every group is fitted first from the original weights (static groups), so the packed tensors keep
   the original column order and the existing formats and kernels run them unchanged (no permutation is stored).

The result is the pass's packed tensors, and its dequantized weight is exactly what the format dequantizes to.

Sequential calibration over the model (`run_layers`, used by `quantize_model` and by `block_sparse` with
`sequential: true`): the calibration tokens go through the embeddings once (the
decoder layers are replaced by stand-ins that record their inputs and keyword arguments: masks, rotary embeddings);
then for each decoder layer in turn: upcast it to float32, accumulate H for its targeted Linears (one Gram matrix
per distinct input tensor: q/k/v and gate/up share theirs), quantize them, run the quantized layer to get the inputs
of the next layer, cast it back. Memory: the model, one layer in float32, the layer inputs of the calibration set and
the Hessians of one layer. Targeted modules outside the decoder layers (there are none with the default
`ignore: [lm_head]`) are rounded to nearest and reported.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Protocol

import torch
from pydantic import Field

from ..compress.calibration import CalibrationSettings
from ..compress.errors import PlanError, RecipeError
from ..compress.formats import PackedTensor
from ..compress.passes import PassKind, TargetedPass, TensorState

log = logging.getLogger("bitsmith")


# ------------------------------------------------------------------------------------------------------- config

class Calibration(CalibrationSettings):
    """`calibration:` of `rounding: gptq` (keys in `bitsmith.compress.calibration.CalibrationSettings`), with more and
    longer sequences by default: GPTQ solves with a full [K, K] Hessian per Linear."""

    samples: int = Field(128, ge=1, description="calibration sequences")
    seq_len: int = Field(512, ge=2, description="tokens per calibration sequence")
    batch_size: int = Field(8, ge=1, description="sequences per forward")


class QuantizerPass(TargetedPass):
    """Base of the quantizing passes: `rounding: nearest | gptq` and its options.

    The pass kind follows the rounding: nearest is a tensor pass (one weight at a time); gptq needs activations, so
    it is a model pass that packs (the engine selects its targets like a tensor pass's).
    """

    rounding: Literal["nearest", "gptq"] = Field("nearest", description="nearest: round each weight to its nearest grid value (weights"
                                                 " only); gptq: error feedback along the columns with calibration"
                                                 " Hessians")
    calibration: Optional[Calibration] = Field(None, description="rounding gptq: calibration text and sampling")
    damp: float = Field(0.01, gt=0.0, le=10.0, description="rounding gptq: H += damp * mean(diag H) * I")
    block_size: int = Field(128, ge=1, le=8192, description="rounding gptq: columns per lazy batch update")
    act_order: bool = Field(False, description="rounding gptq: columns by decreasing H_jj (groups unchanged)")

    @property
    def kind(self) -> PassKind:  # type: ignore[override]
        return PassKind.MODEL if self.rounding == "gptq" else PassKind.TENSOR

    def check_rounding(self) -> "QuantizerPass":
        """Call from the pass's model validator: gptq-only options need rounding gptq."""
        if self.rounding != "gptq":  # non-default values only (a recipe written back in full lists every key)
            fields = type(self).model_fields
            extra = [k for k in ("calibration", "damp", "block_size", "act_order")
                     if getattr(self, k) != fields[k].default]
            if extra:
                raise ValueError(f"{', '.join(extra)} need rounding: gptq (rounding is {self.rounding!r})")
        return self

    @property
    def calib(self) -> Calibration:
        return self.calibration or Calibration()

    def plan_rounding(self) -> None:
        """Plan-time checks of rounding gptq: the calibration text exists (nothing is read)."""
        if self.rounding == "gptq":
            from ..compress.calibration import check_text_source

            check_text_source(self.calib.text, f"{self.type}.calibration")


ROUNDINGS = ("nearest", "gptq")


# --------------------------------------------------------------------------------------------------------- grid

class ColumnGrid(Protocol):
    """A quantizer's grid for one matrix W [N, K], as GPTQ drives it.

    `group_size` columns share parameters (the last group may be partial). `fit_group(gi, w)` fits group gi's
    parameters from its current weights w [N, c]; `quantize(gi, col)` rounds one column [N] (float32) to the grid and
    returns (dequantized value [N] float32, code [N] integer tensor); `pack(state, codes)` stores the codes [N, K]
    (uint8) and the fitted parameters on the state as the pass's packed format and returns (state, the exact float32
    weight the format dequantizes to).
    """

    group_size: int

    def fit_group(self, gi: int, w: torch.Tensor) -> None: ...

    def quantize(self, gi: int, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pack(self, state: TensorState, codes: torch.Tensor) -> tuple[TensorState, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------------------ the core

@dataclass
class GptqResult:
    codes: torch.Tensor  # uint8 [N, K], original column order
    deq: torch.Tensor  # float32 [N, K], the grid values
    damp: float  # the damping that factorized


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 (float64 work, float32 out), and the damping used."""
    Hd = H.to(torch.float64)
    mean = float(Hd.diagonal().mean())
    eye = torch.eye(Hd.shape[0], dtype=torch.float64, device=Hd.device)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(Hd + (damp * mean) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_solve(eye, L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U.to(torch.float32), damp
        damp *= 10
    raise RecipeError(f"gptq: the calibration Hessian is not positive definite even with damp {damp}; use more"
                      " calibration samples")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, grid: ColumnGrid, *, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False) -> GptqResult:
    """Quantize w [N, K] on `grid` with GPTQ error feedback under the Hessian H [K, K] (sum of x x^T)."""
    Wt = w.detach().to(torch.float32).t().contiguous()  # Wt: [K, N], a column of W is a contiguous row here
    K, N = Wt.shape
    H = H.detach().to(torch.float32).clone()
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H[dead, dead] = 1.0
        Wt[dead] = 0.0
    g = grid.group_size
    G = math.ceil(K / g)
    if act_order:
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        for gi in range(G):  # static groups: fitted from the original weights, original column order
            grid.fit_group(gi, Wt[gi * g:min(K, gi * g + g)].t())
        Wt = Wt[order]
        H = H[order][:, order]
        order_list = order.tolist()
    else:
        order_list = list(range(K))
    U, used = _inverse_cholesky(H, damp)
    del H
    threads = torch.get_num_threads()
    if Wt.device.type == "cpu":  # the column loop is thousands of small ops: thread barriers cost more than they give
        torch.set_num_threads(1)
    try:
        Qt, codes_t = _columns(Wt, U, grid, order_list, block_size, act_order)
    finally:
        torch.set_num_threads(threads)
    return GptqResult(codes_t.t().contiguous(), Qt.t().contiguous(), used)


def _columns(Wt: torch.Tensor, U: torch.Tensor, grid: ColumnGrid, order_list: list[int], block_size: int,
             act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ sweep over the rows of Wt [K, N] (columns of W) in order; returns (Qt [K, N], codes_t [K, N])."""
    K, N = Wt.shape
    g = grid.group_size
    Qt = torch.empty(K, N, dtype=torch.float32, device=Wt.device)
    codes_t = torch.empty(K, N, dtype=torch.uint8, device=Wt.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = Wt[i1:i2].clone()  # [B, N]
        E1 = torch.empty(i2 - i1, N, dtype=torch.float32, device=Wt.device)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = order_list[i1 + i]
            gi = j // g
            if not act_order and j % g == 0:  # first column of its group: fit it from its current weights
                c = min(K, j + g) - j
                cur = W1[i:i + c]
                if cur.shape[0] < c:
                    cur = torch.cat([cur, Wt[i2:i2 + c - cur.shape[0]]], 0)
                grid.fit_group(gi, cur.t())
            col = W1[i]
            q, code = grid.quantize(gi, col)
            Qt[j] = q
            codes_t[j] = code.to(torch.uint8)
            e = E1[i]
            torch.sub(col, q, out=e).div_(U1[i, i])
            W1[i:].addr_(U1[i, i:], e, alpha=-1.0)  # W1[k] -= U[i, k] e for the block's later columns
        if i2 < K:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)  # the lazy batch update of all later columns
    return Qt, codes_t


def output_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the squared output error of the layer summed over the calibration tokens."""
    d = q.detach().to(torch.float32) - w.detach().to(torch.float32)
    return float(((d @ H.detach().to(torch.float32)) * d).sum())


def quantize_with_hessian(cfg, state: TensorState, H: torch.Tensor, group_size: int | None = None
                          ) -> tuple[TensorState, torch.Tensor]:
    """GPTQ-round one weight (state.tensor [N, K]) on the pass `cfg`'s grid and pack it like the pass would.

    Returns (the packed state, the exact float32 weight the packed format dequantizes to)."""
    grid = cfg.column_grid(state, H.diagonal(), group_size)
    w = state.tensor
    res = gptq_quantize(w, H, grid, block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order)
    state, exact = grid.pack(state, res.codes)
    if not torch.equal(exact, res.deq):  # the codes are the truth; the grid values must agree exactly
        raise RuntimeError(f"gptq: {state.name}: grid values differ from the packed format's dequantization"
                           f" (max {float((exact - res.deq).abs().max()):.3g})")
    err = output_error(w, exact, H)
    base = output_error(w, torch.zeros_like(exact), H)
    facts = state.facts.setdefault(cfg.type, {})
    facts.update({"rounding": "gptq", "output_rel_error": round(err / max(base, 1e-30), 6), "damp": res.damp,
                  "act_order": cfg.act_order})
    return state, exact


# ------------------------------------------------------------------------------------- sequential calibration

class _Stop(Exception):
    pass


class _Catch(torch.nn.Module):
    """Stands in for a decoder layer: records its inputs, returns its hidden states unchanged (or stops the forward)."""

    def __init__(self, layer: torch.nn.Module, record: list, last: bool):
        super().__init__()
        self.record, self.last = record, last
        for attr in ("attention_type", "layer_idx", "is_sliding", "sliding_window"):  # read by some model loops
            if hasattr(layer, attr):
                object.__setattr__(self, attr, getattr(layer, attr))

    def forward(self, hidden_states, *args, **kwargs):
        self.record.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layer stack: the ModuleList with the most children among the model's ModuleLists."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise PlanError("gptq: the model has no list of decoder layers (nn.ModuleList) to calibrate layer by layer")
    return best


def _to(x, device, dtype):
    if isinstance(x, torch.Tensor):
        x = x.to(device)
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_to(v, device, dtype) for v in x)
    if isinstance(x, list):
        return [_to(v, device, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    return x


def capture_layer_inputs(model, layers: torch.nn.ModuleList, tokens: torch.Tensor, batch_size: int, device
                         ) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Hidden states entering layer 0 per batch (float32) and each layer's (args, kwargs) per batch."""
    records: list[list] = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catch(layer, records[i], last=(i == len(originals) - 1))
    hidden: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for b in range(0, tokens.shape[0], batch_size):
                ids = tokens[b:b + batch_size].to(device)
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
                hidden.append(records[0][-1][0].detach().to(torch.float32))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    per_layer = [[(_to(a, device, torch.float32), _to(k, device, torch.float32)) for _, a, k in rec]
                 for rec in records]
    return hidden, per_layer


class _Hessians:
    """Forward pre-hooks accumulating H = sum x x^T per Linear; one product per distinct input tensor per call."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.H: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._last: tuple | None = None  # (input tensor, its Gram matrix); holding the tensor keeps it unique
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(mod, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:  # the same tensor object: q/k/v, gate/up
                g = self._last[1]
            else:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                g = x2.t() @ x2
                self._last = (x, g)
            if name in self.H:
                self.H[name] += g
            else:
                self.H[name] = g.clone()
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
        self._last = None


def peak_memory_mb(device) -> float:
    """Peak memory of this run: CUDA max allocated on a GPU, the process's peak RSS on the CPU (MB)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class GptqReport:
    seconds: float = 0.0
    peak_mb: float = 0.0
    tokens: int = 0
    layers: int = 0
    per_layer: list = field(default_factory=list)  # (layer index, seconds, mean output relative error)
    nearest_fallback: list = field(default_factory=list)


@dataclass
class LayerStep:
    """One decoder layer during `run_layers`: `layer` is in float32 until the step ends; `run()` sends the
    calibration inputs (the outputs of the already processed earlier layers) through it, so that hooks on its
    modules see them."""

    index: int
    name: str  # the layer's module name, e.g. "model.layers.3"
    layer: torch.nn.Module
    dtype: torch.dtype  # the layer's own dtype (restored when the step ends)
    hidden: list  # float32 hidden states entering the layer, one per batch
    kwargs: list  # (args, kwargs) of the layer per batch

    @torch.no_grad()
    def run(self) -> list[torch.Tensor]:
        """The layer's outputs on the calibration inputs (float32, one per batch)."""
        return [_first(self.layer(h, *a, **k)).to(torch.float32) for h, (a, k) in zip(self.hidden, self.kwargs)]


def run_layers(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, device,
               process: Callable[[LayerStep], None], finished: Callable[[LayerStep], None] | None = None
               ) -> tuple[str, int]:
    """Sequential calibration: the tokens [S, L] go through the embeddings once (`capture_layer_inputs`); then for
    each decoder layer in order: upcast it to float32, `process(step)` (collect statistics with `step.run()` under
    hooks, change its weights), run the processed layer to get the next layer's inputs, cast it back, then
    `finished(step)`. Memory: one layer in float32 and the hidden states of the calibration set.
    Returns (the layer stack's name, its number of layers)."""
    stack_name, layers = find_layers(model)
    hidden, kwargs = capture_layer_inputs(model, layers, tokens, batch_size, device)
    for li in range(len(layers)):
        layer = layers[li]
        dtype = next(layer.parameters()).dtype
        layer.to(torch.float32)
        step = LayerStep(li, f"{stack_name}.{li}", layer, dtype, hidden, kwargs[li])
        try:
            process(step)
            hidden = step.run()
        finally:
            layer.to(dtype)
        kwargs[li] = None
        step.hidden = step.kwargs = None
        if finished is not None:
            finished(step)
    return stack_name, len(layers)


def quantize_model(cfg, model: torch.nn.Module, tokens: torch.Tensor, targets: dict[str, tuple[str, str]],
                   group_sizes: dict[str, int], *, device=None, progress: bool = False, log_fn=None,
                   nearest=None) -> tuple[dict[str, TensorState], GptqReport]:
    """GPTQ over the decoder layers in order (`run_layers`). `targets`: {weight name: (module, class)};
    `group_sizes`: {weight name: size} where the pass chose them beforehand (finequant auto). Returns ({weight name:
    packed state}, report).

    `nearest(state) -> state` rounds a targeted weight that lies outside the decoder layers (no calibration inputs
    are collected there).
    """
    from tqdm.auto import tqdm

    say = log_fn or log.info
    start = time.time()
    if device is None:
        device = next(model.parameters()).device
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stack_name, layers = find_layers(model)
    by_module = {mod: (wname, cls) for wname, (mod, cls) in targets.items()}
    named = dict(model.named_modules())
    calib = cfg.calib
    report = GptqReport(tokens=int(tokens.numel()), layers=len(layers))
    results: dict[str, TensorState] = {}
    done: set[str] = set()
    bar = tqdm(total=len(layers), desc=f"{cfg.type} gptq", disable=not progress, leave=False)
    cur: dict = {}

    def process(step: LayerStep) -> None:
        cur["t0"] = time.time()
        mods = {m: named[m] for m in by_module if m.startswith(step.name + ".")}
        errs = cur["errs"] = []
        cur["n"] = len(mods)
        if not mods:
            return
        hs = _Hessians(mods)
        step.run()
        hs.remove()
        for m, mod in mods.items():
            wname, cls = by_module[m]
            # the layer computes in float32, but the grid's coefficients (scale_dtype: auto) must follow the
            # model's dtype; the upcast was exact, so casting back loses nothing
            state = TensorState(wname, mod.weight.detach().to(step.dtype), m, cls)
            state, deq = quantize_with_hessian(cfg, state, hs.H[m], group_sizes.get(wname))
            with torch.no_grad():
                mod.weight.copy_(deq)  # the next layers see exactly what the packed format computes
            state.tensor = deq.to(step.dtype)
            results[wname] = state
            done.add(m)
            errs.append(state.facts[cfg.type]["output_rel_error"])
        del hs

    def finished(step: LayerStep) -> None:
        secs = time.time() - cur["t0"]
        errs = cur["errs"]
        mean_err = sum(errs) / len(errs) if errs else 0.0
        report.per_layer.append((step.index, round(secs, 2), round(mean_err, 6)))
        say(f"{cfg.type} gptq: layer {step.index + 1}/{len(layers)}: {cur['n']} Linears, {secs:.1f} s, mean output"
            f" relative error {mean_err:.5f}, peak {peak_memory_mb(device):.0f} MB")
        bar.update(1)

    run_layers(model, tokens, calib.batch_size, device, process, finished)
    bar.close()
    for m, (wname, cls) in by_module.items():
        if m in done:
            continue
        if nearest is None:
            raise PlanError(f"gptq: {m} is outside the decoder layers ({stack_name}); ignore it")
        mod = named[m]
        state = nearest(TensorState(wname, mod.weight.detach().clone(), m, cls))
        with torch.no_grad():
            mod.weight.copy_(state.tensor)
        results[wname] = state
        report.nearest_fallback.append(m)
    if report.nearest_fallback:
        say(f"{cfg.type} gptq: rounded to nearest (outside the decoder layers, no calibration inputs):"
            f" {', '.join(report.nearest_fallback)}")
    report.seconds = round(time.time() - start, 2)
    report.peak_mb = round(peak_memory_mb(device), 1)
    return results, report


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------------- the model pass

TOKENS_KEY = "calibration.tokens"  # ctx.extra[TOKENS_KEY]: LongTensor [S, L] used instead of sampling text


def model_targets(cfg, model, plan_fn) -> dict[str, tuple[str, str]]:
    """{weight name: (module, class)} the pass quantizes in a live model (targets less ignore, less plan skips)."""
    from ..compress.inventory import inventory_from_model, select

    chosen, skipped = select(inventory_from_model(model), cfg.targets, cfg.ignore, cfg.type)
    if plan_fn is not None:
        skipped.update(plan_fn(cfg, [m for m in chosen if m.name not in skipped]))
    return {m.weight: (m.name, m.class_name) for m in chosen if m.name not in skipped}


def calibration_tokens(cfg, ctx) -> torch.Tensor:
    from ..compress import calibration as C

    calib = cfg.calib
    where = f"{cfg.type}.calibration"
    tok_path = calib.tokenizer or (getattr(ctx, "input_path", None) if ctx is not None else None)
    tokenizer = C.load_tokenizer(tok_path, where)
    return C.calibration_batches(calib.text, tokenizer, calib.samples, calib.seq_len, calib.seed,
                                 text_field=calib.text_field, split=calib.split, where=where)


def run_model_pass(cfg, model, ctx, plan_fn, nearest, group_sizes_fn=None) -> dict[str, TensorState]:
    """The model-pass handler body for `rounding: gptq`: returns {weight name: packed TensorState}."""
    targets = model_targets(cfg, model, plan_fn)
    if not targets:
        raise PlanError(f"{cfg.type}: rounding gptq: no module to quantize")
    say = ctx.log if ctx is not None and hasattr(ctx, "log") else log.info
    t0 = time.time()
    given = (getattr(ctx, "extra", None) or {}).get(TOKENS_KEY) if ctx is not None else None
    tokens = given if given is not None else calibration_tokens(cfg, ctx)
    group_sizes = group_sizes_fn(targets) if group_sizes_fn is not None else {}
    device = getattr(ctx, "device", None) if ctx is not None else None
    progress = bool(getattr(ctx, "progress", False)) if ctx is not None else False
    results, report = quantize_model(cfg, model, tokens, targets, group_sizes, device=device, progress=progress,
                                     log_fn=say, nearest=nearest)
    for st in results.values():  # downstream (writer, hashing) works on CPU tensors
        st.tensor = st.tensor.cpu()
        if st.packed is not None:
            st.packed.tensors.update({k: t.cpu() for k, t in st.packed.tensors.items()})
    total = time.time() - t0
    say(f"{cfg.type} gptq: {len(results)} weights, {report.layers} layers, {report.tokens} calibration tokens,"
        f" {total:.1f} s (layers {report.seconds:.1f} s), peak memory {report.peak_mb:.0f} MB")
    if ctx is not None and getattr(ctx, "extra", None) is not None:
        ctx.extra.setdefault("gptq.report", []).append({"type": cfg.type, "seconds": round(total, 2),
                                                        "layer_seconds": report.seconds, "peak_mb": report.peak_mb,
                                                        "tokens": report.tokens, "per_layer": report.per_layer,
                                                        "nearest_fallback": report.nearest_fallback})
    return results


def rounding_handler(apply_nearest, plan_fn, name: str, doc: str):
    """A QuantizerPass's apply handler from its round-to-nearest tensor apply `apply_nearest(cfg, state) -> state`.

    Given a TensorState (rounding nearest, a tensor pass) it rounds that weight; given a model (rounding gptq, a
    model pass) it runs `run_model_pass` over the model, with `apply_nearest` as the fallback for targets outside
    the decoder layers, and returns {weight name: packed TensorState}.
    """
    def apply(cfg, state, ctx=None):
        if isinstance(state, TensorState):
            return apply_nearest(cfg, state)
        near = cfg.model_copy(update={"rounding": "nearest"})
        return run_model_pass(cfg, state, ctx, plan_fn, lambda st: apply_nearest(near, st))

    apply.__name__ = apply.__qualname__ = name
    apply.__doc__ = doc
    return apply
