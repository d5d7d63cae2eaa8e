"""`soup`: average the weights of models fine-tuned from one start (checkpoint pass, first in a recipe).

The MODEL argument of `bitsmith compress` is the *reference*: it gives the output's config.json, tokenizer and other
side files, the tensor names and each tensor's output dtype, and every ingredient is checked against it. It is NOT an
ingredient (its weights are not read) unless it is also listed in `models:`; for `task_arithmetic` it is the base
when `base:` is not given. Methods (`method:`):

- `uniform`: the mean of the `models:`.
- `linear`: sum_i weights[i] * model_i (`weights:`, one per model, used as given: no normalization).
- `task_arithmetic`: base + scale * sum_i weights[i] * (model_i - base) (weights default to 1).
- `greedy` (Wortsman et al. 2022): every model is scored alone on the held-out measure (`eval:`), they are sorted
  best first, the soup starts with the best, and each next one is kept when the mean with it scores no worse than
  the soup without it. The soup is never worse than the best ingredient on that measure. Every decision is logged
  and written to `soup_report.json`.
- `learned`: per-layer (or per-tensor) softmax mixing weights fitted on the held-out text (`learned.py`).

`eval:` a UTF-8 text file (perplexity over its first `eval_tokens` tokens, windows of `eval_window`), or
`module:function`, imported only when given: `function(model, tokenizer) -> float`, lower is better unless
`maximize: true`. Learned soups need a text file (they fit a loss).

Memory: uniform, linear and task_arithmetic read one tensor name from every model in turn (a few tensors in memory).
Greedy holds one eval model (float32) and one accumulator the size of the model. Learned holds all N models on the
device (see `learned.py`). Before anything is read or written, the models are checked: the same architecture
(`model_type`, `architectures`, the config's size keys), tensor names and shapes, and tokenizer files (sha256);
the first mismatch is the error. Mixed dtypes are averaged in float32 (float64 if an input is float32) and written in
the reference's dtype.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..compress.checkpoint import CheckpointReader, resolve_model_path
from ..compress.errors import CheckpointError, PlanError
from ..compress.passes import PassConfig, PassKind, TensorState, register_pass
from ..compress.sources import CheckpointSource, Source, SourceView
from . import mixing

REPORT_FILE = "soup_report.json"
METHODS = ("uniform", "greedy", "learned", "linear", "task_arithmetic")
# Files that define the vocabulary. tokenizer_config.json, special_tokens_map.json and chat templates are not
# compared (fine-tuning scripts often rewrite them); the output keeps the reference's.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
               "merges.txt", "vocab.txt", "added_tokens.json")
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class Soup(PassConfig):
    """Average fine-tuned models: uniform, greedy, learned soups; plain linear merges and task arithmetic."""

    type: Literal["soup"] = "soup"
    models: tuple[str, ...] = Field((), description="the ingredients: model folders or Hub ids")
    method: Literal["uniform", "greedy", "learned", "linear", "task_arithmetic"] = "uniform"
    weights: Optional[tuple[float, ...]] = Field(None, description="linear / task_arithmetic: one per model")
    base: Optional[str] = Field(None, description="task_arithmetic: the model the tasks are measured from "
                                                  "(null: the MODEL argument)")
    scale: float = Field(1.0, description="task_arithmetic: multiplies the sum of task vectors")
    eval: Optional[str] = Field(None, description="greedy / learned: held-out text file, or module:function")
    maximize: bool = Field(False, description="a module:function eval: higher is better")
    eval_tokens: Optional[int] = Field(8192, ge=1, description="tokens of the eval text used (null: all)")
    eval_window: int = Field(1024, ge=2, description="tokens per window when scoring / fitting on the text")
    granularity: Literal["layer", "tensor"] = Field("layer", description="learned: one weight vector per ...")
    steps: int = Field(40, ge=1, description="learned: optimizer steps")
    lr: float = Field(0.1, gt=0, description="learned: Adam learning rate on the mixing logits")
    batch_size: int = Field(4, ge=1, description="learned: windows per step")
    seed: int = 0

    kind = PassKind.CHECKPOINT

    @field_validator("models", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("weights")
    @classmethod
    def _weights_fit(cls, v: Any, info: ValidationInfo) -> Any:
        method, models = info.data.get("method"), info.data.get("models")
        if v is not None and method not in ("linear", "task_arithmetic"):
            raise ValueError(f"weights are for method linear or task_arithmetic, not {method}")
        if v is not None and models and len(v) != len(models):
            raise ValueError(f"{len(v)} weights for {len(models)} models (one weight per model)")
        return v

    @field_validator("base")
    @classmethod
    def _base_fits(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("method") != "task_arithmetic":
            raise ValueError(f"base is for method task_arithmetic, not {info.data.get('method')}")
        return v

    @field_validator("eval")
    @classmethod
    def _eval_fits(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("method") not in ("greedy", "learned"):
            raise ValueError(f"eval is used by methods greedy and learned only, not {info.data.get('method')}"
                             " (remove it)")
        return v

    @model_validator(mode="after")
    def _linear_has_weights(self) -> "Soup":
        if self.method == "linear" and self.weights is None:
            raise ValueError("method linear needs weights (one per model)")
        return self


# ------------------------------------------------------------------------------------------------------ checking

@dataclass
class _Model:
    label: str  # name for messages and the report: Hub id, or the folder's name (never a full local path)
    spec: str  # as written in the recipe
    reader: CheckpointReader


def _label(spec: str, path: Path) -> str:
    return path.resolve().name if Path(spec).expanduser().exists() else spec


def _arch_facts(config: dict, prefix: str = "") -> dict[str, Any]:
    """The config keys that decide the architecture and every tensor's shape."""
    out: dict[str, Any] = {}
    for k, v in sorted(config.items()):
        if isinstance(v, dict) and k.endswith("_config") and k != "quantization_config":
            out.update(_arch_facts(v, f"{prefix}{k}."))
        elif k in ("model_type", "architectures", "tie_word_embeddings", "head_dim") or k.startswith("num_") \
                or k.endswith("_size"):
            out[prefix + k] = v
    return out


def _digests(files: dict[str, Path | bytes]) -> dict[str, str]:
    out = {}
    for name in VOCAB_FILES:
        src = files.get(name)
        if src is not None:
            out[name] = hashlib.sha256(src.read_bytes() if isinstance(src, Path) else src).hexdigest()
    return out


def _compare(model: _Model, what: str, view: SourceView, ref_tok: dict[str, str] | None) -> None:
    """Raise naming the first way `model` differs from the reference (config, tensors, shapes, tokenizer)."""
    where = f"soup: {what} ({model.label})"
    cfg = model.reader.config
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "bitsmith" or qc:
        raise PlanError(f"{where}: its weights are quantized ({qc.get('quant_method')}); soups need dense weights")
    mine, ref = _arch_facts(cfg), _arch_facts(view.config)
    for key in sorted(set(mine) | set(ref)):
        if mine.get(key) != ref.get(key):
            raise PlanError(f"{where}: config.json {key} is {mine.get(key)!r}, the reference model's is "
                            f"{ref.get(key)!r}; soups need one architecture")
    theirs = model.reader.tensors
    for name in view.tensors:
        if name not in theirs:
            raise PlanError(f"{where}: has no tensor {name!r}, which the reference model has")
    for name in theirs:
        if name not in view.tensors:
            raise PlanError(f"{where}: has a tensor {name!r} that the reference model does not")
    for name, (shape, dtype) in view.tensors.items():
        info = theirs[name]
        if tuple(info.shape) != tuple(shape):
            raise PlanError(f"{where}: tensor {name!r} has shape {list(info.shape)}, the reference model's is "
                            f"{list(shape)}")
        if info.dtype.is_floating_point != dtype.is_floating_point:
            raise PlanError(f"{where}: tensor {name!r} is {info.dtype}, the reference model's is {dtype}")
    if ref_tok is not None:
        tok = _digests({p.name: p for p in model.reader.side_files()})
        for name in sorted(set(tok) | set(ref_tok)):
            if name not in tok:
                raise PlanError(f"{where}: has no tokenizer file {name}, which the reference model has")
            if name not in ref_tok:
                raise PlanError(f"{where}: has a tokenizer file {name} that the reference model does not")
            if tok[name] != ref_tok[name]:
                raise PlanError(f"{where}: tokenizer file {name} differs from the reference model's (sha256 "
                                f"{tok[name][:12]} vs {ref_tok[name][:12]}); soups need one tokenizer")


def _open(spec: str, what: str) -> _Model:
    try:
        path = resolve_model_path(spec)
        return _Model(_label(spec, path), spec, CheckpointReader(path))
    except CheckpointError as e:
        raise CheckpointError(f"soup: {what}: {e}") from None


def _check(cfg: Soup, view: SourceView, side_files: dict | None) -> tuple[list[_Model], _Model | None]:
    if not cfg.models:
        raise PlanError("soup: no models given; list the ingredients under `models:` in the recipe, or pass "
                        "--set 'models=[FOLDER_A, FOLDER_B, ...]'")
    if cfg.method in ("greedy", "learned") and not cfg.eval:
        raise PlanError(f"soup: method {cfg.method} needs a held-out measure: `eval: TEXT_FILE` (or "
                        "module:function for greedy), e.g. --set eval=heldout.txt")
    if view.packed_modules:
        raise PlanError("soup: the reference model's weights are packed; soups need dense weights (and soup must "
                        "be the first pass of a recipe)")
    ref_tok = _digests(side_files) if side_files is not None else None
    models = [_open(s, f"models[{i}]") for i, s in enumerate(cfg.models)]
    seen: dict[str, int] = {}
    for m in models:  # two folders of the same name: number them, so the report tells them apart
        seen[m.label] = seen.get(m.label, 0) + 1
    count: dict[str, int] = {}
    for m in models:
        if seen[m.label] > 1:
            count[m.label] = count.get(m.label, 0) + 1
            m.label = f"{m.label}#{count[m.label]}"
    for i, m in enumerate(models):
        _compare(m, f"models[{i}]", view, ref_tok)
    base = None
    if cfg.method == "task_arithmetic" and cfg.base is not None:
        base = _open(cfg.base, "base")
        _compare(base, "base", view, ref_tok)
    _eval_target(cfg)
    return models, base


def _eval_target(cfg: Soup):
    """('text', Path) or ('callable', function); imports the module only when the recipe names one."""
    if cfg.eval is None:
        return None
    p = Path(cfg.eval).expanduser()
    if p.is_file():
        return "text", p
    if not _CALLABLE.fullmatch(cfg.eval):
        raise PlanError(f"soup: eval {cfg.eval!r} is neither an existing text file nor module:function")
    if cfg.method == "learned":
        raise PlanError(f"soup: method learned fits a loss on held-out text; eval must be a text file, not "
                        f"{cfg.eval!r}")
    mod_name, _, attr = cfg.eval.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise PlanError(f"soup: eval {cfg.eval!r}: cannot import module {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PlanError(f"soup: eval {cfg.eval!r}: module {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PlanError(f"soup: eval {cfg.eval!r} is not callable")
    return "callable", obj


def plan(cfg: Soup, view: SourceView) -> SourceView:
    _check(cfg, view, None)  # tokenizers are compared in apply, where the reference's files are known
    return view.copy()


# -------------------------------------------------------------------------------------------------------- running

class SoupSource:
    """Serves the soup's tensors under the reference's names, computed one name at a time."""

    def __init__(self, cfg: Soup, inner: Source, ctx, models: list[_Model], base: _Model | None):
        self.cfg, self.inner, self.ctx, self.models, self.base = cfg, inner, ctx, models, base
        self.view = inner.view
        self._names = inner.names()
        self._getters = [m.reader.get for m in models]
        self._labels = [m.label for m in models]
        self._prepared = False
        self._greedy: mixing.GreedyResult | None = None
        self._learned = None
        self.report: dict[str, Any] = {"method": cfg.method, "models": self._labels}
        if cfg.method == "linear":
            self.report["weights"] = list(cfg.weights or ())
        if cfg.method == "task_arithmetic":
            self.report.update(base=base.label if base else "(the reference model)", scale=cfg.scale,
                               weights=list(cfg.weights) if cfg.weights else [1.0] * len(models))

    def names(self) -> list[str]:
        return self._names

    def _dtype(self, name: str) -> torch.dtype:
        return self.view.tensors[name][1]

    def _base_getter(self):
        if self.base is not None:
            return self.base.reader.get
        return lambda n: self.inner.read(n).tensor

    def read(self, name: str) -> TensorState:
        self._prepare()
        cfg, dt = self.cfg, self._dtype(name)
        if cfg.method == "greedy":
            out = self._greedy.mean(name, dt)
            del self._greedy.sums[name]  # each name is read once: free the accumulator as we go
        elif cfg.method == "learned":
            out = mixing.weighted_sum(self._getters, name, self._learned.weights_for(name), dt, self._labels)
        elif cfg.method == "task_arithmetic":
            out = mixing.weighted_sum(self._getters, name, cfg.weights, dt, self._labels, base=self._base_getter(),
                                      scale=cfg.scale)
        else:  # uniform, linear
            out = mixing.weighted_sum(self._getters, name, cfg.weights, dt, self._labels)
        return TensorState(name, out)

    def side_files(self) -> dict[str, Path | bytes]:
        self._prepare()
        out = dict(self.inner.side_files())
        out[REPORT_FILE] = (json.dumps(self.report, indent=2) + "\n").encode()
        return out

    # --- greedy and learned: evaluation before the first tensor is served ----------------------------------------
    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        if self.cfg.method not in ("greedy", "learned"):
            return
        from transformers import AutoTokenizer

        from ..compress.evaluate import read_text

        cfg = self.cfg
        kind, target = _eval_target(cfg)
        ref_path = self.inner.reader.path
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(ref_path))
        except Exception as e:  # transformers raises many types here
            raise CheckpointError(f"soup: {cfg.method} needs the reference model's tokenizer: {e}") from None
        names = self._names
        model = mixing.build_model(self.view.config, self.ctx.device)
        dtypes = {n: self._dtype(n) for n in names}
        if kind == "text":
            text = read_text(target)
            self.report["eval"] = {"text": target.name, "tokens": cfg.eval_tokens, "window": cfg.eval_window,
                                   "measure": "perplexity (lower is better)"}
            score = mixing.perplexity_scorer(model, names, tokenizer, text, cfg.eval_tokens, cfg.eval_window)
        else:
            sign = -1.0 if cfg.maximize else 1.0
            self.report["eval"] = {"callable": cfg.eval, "measure": "higher is better" if cfg.maximize
                                   else "lower is better"}

            def score(getter) -> float:
                mixing.load_weights(model, names, getter)
                with torch.no_grad():
                    return sign * float(target(model, tokenizer))
        if cfg.method == "greedy":
            res = mixing.greedy_soup(self._getters, names, dtypes, score, self._labels, log=self.ctx.log)
            self._greedy = res
            unsign = (lambda s: -s) if kind == "callable" and cfg.maximize else (lambda s: s)
            self.report["greedy"] = {
                "scores": {self._labels[i]: unsign(s) for i, s in enumerate(res.scores)},
                "order": [self._labels[i] for i in res.order],
                "decisions": [dict(d, alone=unsign(d["alone"]), soup_with=unsign(d["soup_with"]),
                                   soup_before=None if d["soup_before"] is None else unsign(d["soup_before"]))
                              for d in res.decisions],
                "chosen": [self._labels[i] for i in res.chosen],
                "soup_score": unsign(res.soup_score),
            }
        else:
            from .learned import fit_learned_soup, token_windows

            windows = token_windows(tokenizer, text, cfg.eval_window, cfg.eval_tokens)
            res = fit_learned_soup(model, names, self._getters, windows, granularity=cfg.granularity,
                                   steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                                   log=self.ctx.log)
            self._learned = res
            final = score(lambda n: mixing.weighted_sum(self._getters, n, res.weights_for(n), dtypes[n]))
            self.report["learned"] = {
                "granularity": cfg.granularity, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
                "windows": int(windows.shape[0]), "loss_first": res.losses[0], "loss_last": res.losses[-1],
                "soup_score": final,
                "weights": {g: dict(zip(self._labels, w)) for g, w in res.weights.items()},
            }
            self.ctx.log(f"soup: learned soup scores {final:.6g} on the fit text")
        del model


def apply(cfg: Soup, source: Source, ctx) -> SoupSource:
    if not isinstance(source, CheckpointSource):
        raise PlanError("soup must be the first pass of a recipe (it replaces the weights of the MODEL argument, "
                        "so passes before it would be lost)")
    models, base = _check(cfg, source.view, source.side_files())
    return SoupSource(cfg, source, ctx, models, base)


register_pass(Soup, apply=apply, plan=plan)
