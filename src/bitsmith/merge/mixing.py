"""Soup arithmetic: weighted means of checkpoints, one tensor name at a time, and the greedy soup loop.

This module needs torch and transformers only (no pydantic, no pipeline), so scripts can use it where bitsmith's pass
configs cannot be imported (`benchmarks/soup_experiment.py` on a GPU machine). The `soup` pass (`soup.py`) calls it.

An ingredient is a *getter*: a callable `name -> tensor` (`CheckpointReader.get`, `dict.get` of a state dict...).
Every function reads one tensor name from every ingredient at a time, so memory holds a few tensors, never N models.

Precision. Floating tensors are summed in float32, or in float64 when an input is already float32 or float64, and
the result is rounded once to the output dtype (the reference checkpoint's). A uniform mean is a sum divided by N
(not a sum of x/N), so the mean of N identical copies is the input bit for bit: N*x is exact in the accumulator and
(N*x)/N rounds back to x. Integer and bool tensors are not averaged: every ingredient must hold the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..compress.errors import CheckpointError

Getter = Callable[[str], torch.Tensor]


def accumulator_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float32/float64 (so identical copies average exactly), else float32."""
    return torch.float64 if any(d in (torch.float32, torch.float64) for d in dtypes) else torch.float32


def _same_values(name: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> torch.Tensor:
    first = tensors[0]
    for t, label in zip(tensors[1:], labels[1:]):
        if not torch.equal(first, t):
            raise CheckpointError(f"tensor {name!r} ({first.dtype}) is not floating point and differs between "
                                  f"{labels[0]} and {label}; integer tensors cannot be averaged")
    return first.clone()


def weighted_sum(getters: Sequence[Getter], name: str, weights: Sequence[float] | None, out_dtype: torch.dtype,
                 labels: Sequence[str] | None = None, base: Getter | None = None, scale: float = 1.0) -> torch.Tensor:
    """One output tensor from N ingredients, reading one ingredient's tensor at a time.

    weights None: the mean (sum / N). Otherwise sum_i weights[i] * x_i.
    base given (task arithmetic): base + scale * sum_i weights[i] * (x_i - base), weights None meaning all 1.
    """
    labels = list(labels or [f"model {i}" for i in range(len(getters))])
    if not getters:
        raise ValueError("weighted_sum needs at least one ingredient")
    first = getters[0](name)
    if not first.is_floating_point():
        rest = [first] + [g(name) for g in getters[1:]]
        if base is not None:
            rest = [base(name)] + rest
            labels = ["base"] + labels
        return _same_values(name, rest, labels)
    acc_dtype = accumulator_dtype(first.dtype, out_dtype)
    b = base(name).to(acc_dtype, copy=True) if base is not None else None  # copies: never write into an input
    acc: torch.Tensor | None = None
    for i, g in enumerate(getters):
        x = first if i == 0 else g(name)
        if x.shape != first.shape:
            raise CheckpointError(f"tensor {name!r}: {labels[i]} has shape {list(x.shape)}, "
                                  f"{labels[0]} has {list(first.shape)}")
        if acc_dtype is torch.float32 and x.dtype in (torch.float32, torch.float64):
            acc_dtype = torch.float64  # a later ingredient is float32: keep its precision
            acc = acc.to(acc_dtype) if acc is not None else None
            b = b.to(acc_dtype) if b is not None else None
        x = x.to(acc_dtype, copy=True)
        if b is not None:
            x = x - b
        w = 1.0 if weights is None else float(weights[i])
        if acc is None:
            acc = x.mul_(w) if w != 1.0 else x  # x is a copy
        else:
            acc.add_(x, alpha=w)  # alpha 1 is exact
        del x
    if base is None and weights is None:
        acc.div_(len(getters))
    if b is not None:
        acc = b.add_(acc, alpha=scale)
    return acc.to(out_dtype)


# ------------------------------------------------------------------------------------------------- an eval model

def build_model(config: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The transformers model of a config.json dict (random weights; `load_weights` fills them), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, names: Sequence[str], getter: Getter) -> None:
    """Copy every checkpoint tensor `name` given by `getter` into the model (converted to the model's dtype).

    Tied weights need nothing more: the tied copy shares the storage of the tensor the checkpoint stores.
    """
    state = model.state_dict(keep_vars=True)
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointError(f"the model built from config.json has no parameter for tensors {missing[:5]}")
    with torch.no_grad():
        for n in names:
            state[n].data.copy_(getter(n))


# ------------------------------------------------------------------------------------------------------- greedy

@dataclass
class GreedyResult:
    scores: list[float]  # held-out score of each ingredient alone (lower is better)
    order: list[int]  # ingredients by score, best first
    chosen: list[int]  # the soup's ingredients, in the order they were added
    soup_score: float  # held-out score of the final soup
    decisions: list[dict] = field(default_factory=list)  # one per ingredient, in the order tried
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> sum of the chosen (the accumulator)

    def mean(self, name: str, out_dtype: torch.dtype) -> torch.Tensor:
        """The soup's tensor: the sum of the chosen ingredients / their number, rounded once to `out_dtype`."""
        s = self.sums[name]
        if not s.is_floating_point():
            return s.clone()
        return (s / len(self.chosen)).to(out_dtype)


def greedy_soup(getters: Sequence[Getter], names: Sequence[str], out_dtypes: dict[str, torch.dtype],
                score: Callable[[Getter], float], labels: Sequence[str] | None = None,
                log: Callable[[str], None] = print) -> GreedyResult:
    """Greedy soup (Wortsman et al. 2022, Algorithm 1), lower score is better.

    Every ingredient is scored alone; they are sorted by score (ties: the earlier first); the soup starts as the best
    one; each next one is added when the mean of the soup plus it scores no worse than the soup (the paper's rule,
    `>=` on accuracy, here `<=` on a loss), and is left out otherwise. The soup therefore never scores worse than the
    best ingredient on the held-out measure. `score(getter)` evaluates the model whose tensors `getter` gives, rounded
    to `out_dtypes` as they will be written. Memory: one accumulator the size of the model (float32, float64 for
    float32 inputs) plus whatever `score` holds (the eval model).
    """
    labels = list(labels or [f"model {i}" for i in range(len(getters))])
    scores: list[float] = []
    for i, g in enumerate(getters):
        s = float(score(lambda n, g=g: g(n).to(out_dtypes[n])))
        if math.isnan(s):
            raise CheckpointError(f"greedy soup: the held-out score of {labels[i]} is NaN")
        scores.append(s)
        log(f"soup: {labels[i]} alone scores {s:.6g}")
    order = sorted(range(len(getters)), key=lambda i: (scores[i], i))
    best = order[0]
    sums: dict[str, torch.Tensor] = {}
    for n in names:
        x = getters[best](n)
        sums[n] = x.to(accumulator_dtype(x.dtype, out_dtypes[n]), copy=True) if x.is_floating_point() else x.clone()
    chosen = [best]
    current = scores[best]
    decisions = [{"model": labels[best], "index": best, "alone": scores[best], "soup_with": scores[best],
                  "soup_before": None, "added": True, "why": "best ingredient alone: the soup starts with it"}]
    log(f"soup: start with {labels[best]} ({current:.6g})")
    for i in order[1:]:
        g, k = getters[i], len(chosen)

        def candidate(n: str, g=g, k=k) -> torch.Tensor:
            s = sums[n]
            x = g(n)
            if not s.is_floating_point():
                if not torch.equal(s, x):
                    raise CheckpointError(f"tensor {n!r} ({s.dtype}) is not floating point and differs between"
                                          f" {labels[chosen[0]]} and {labels[i]}; integer tensors cannot be averaged")
                return s
            return ((s + x.to(s.dtype)) / (k + 1)).to(out_dtypes[n])

        with_it = float(score(candidate))
        added = with_it <= current  # NaN compares false: never added
        decisions.append({"model": labels[i], "index": i, "alone": scores[i], "soup_with": with_it,
                          "soup_before": current, "added": added,
                          "why": "the soup with it scores no worse" if added else "the soup with it scores worse"})
        log(f"soup: {'add' if added else 'skip'} {labels[i]} (alone {scores[i]:.6g}): soup of {k + 1} scores "
            f"{with_it:.6g} vs {current:.6g}")
        if added:
            for n in names:
                if sums[n].is_floating_point():
                    sums[n].add_(g(n).to(sums[n].dtype))
            chosen.append(i)
            current = with_it
    return GreedyResult(scores, order, chosen, current, decisions, sums)


# -------------------------------------------------------------------------------------------------- perplexity

def perplexity_scorer(model: torch.nn.Module, names: Sequence[str], tokenizer, text: str, max_tokens: int | None,
                      window: int, stride: int | None = None) -> Callable[[Getter], float]:
    """A `score(getter)` for `greedy_soup`: load the tensors into `model`, return its perplexity on `text`."""
    from ..compress.evaluate import perplexity

    def score(getter: Getter) -> float:
        load_weights(model, names, getter)
        return perplexity(model, tokenizer, text, max_tokens=max_tokens, window=window, stride=stride,
                          progress=False)["ppl"]

    return score
