"""Learned soup: per-layer (or per-tensor) mixing weights over N fine-tuned models, fitted on held-out text.

Each group g of tensors (a decoder layer, or one tensor) gets N logits a_g; the soup's tensor is
sum_i softmax(a_g)_i * x_i. The logits start at 0 (the uniform soup) and are fitted with Adam on the causal-LM loss of
held-out token windows; the ingredients' weights are frozen (the model is run with `torch.func.functional_call` on
the mixed tensors, so gradients reach the logits only).

Memory (the limit of this method): every ingredient's tensors are held on the device in float32 for the whole fit
(N models), plus one mixed model kept by autograd, the model's own parameters, and the activations of one batch.
For SmolLM2-135M that is about (N + 2) x 0.54 GB plus activations; a 7B model with 5 ingredients would need ~200 GB.
Use greedy (memory: one model + one accumulator) where that does not fit.

Needs torch and transformers only (no pydantic), like `mixing.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .mixing import Getter

_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj.weight" -> "model.layers.3"


def groups_of(names: Sequence[str], granularity: str) -> dict[str, str]:
    """{tensor name: group}: `layer` puts every tensor under the first `.N.` of its name (a decoder layer) in one
    group and gives each other tensor its own module's group (embeddings, final norm, head); `tensor`: one group each.
    """
    if granularity not in ("layer", "tensor"):
        raise ValueError(f"granularity must be 'layer' or 'tensor', got {granularity!r}")
    out = {}
    for n in names:
        if granularity == "tensor":
            out[n] = n
            continue
        m = _LAYER.match(n)
        out[n] = m.group(1) if m else n.rsplit(".", 1)[0]
    return out


def token_windows(tokenizer, text: str, window: int, max_tokens: int | None) -> torch.Tensor:
    """[B, window] token ids cut from `text` (BOS first in each window when the tokenizer uses one)."""
    from ..compress.evaluate import uses_bos

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = [tokenizer.bos_token_id] if uses_bos(tokenizer) else []
    step = window - len(bos)
    rows = [bos + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]
    if not rows:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class LearnedResult:
    groups: dict[str, str]  # tensor name -> group
    weights: dict[str, list[float]]  # group -> mixing weights (softmax of the logits), one per ingredient
    losses: list[float] = field(default_factory=list)  # training loss per step

    def weights_for(self, name: str) -> list[float]:
        return self.weights[self.groups[name]]


def fit_learned_soup(model: torch.nn.Module, names: Sequence[str], getters: Sequence[Getter], windows: torch.Tensor,
                     *, granularity: str = "layer", steps: int = 40, lr: float = 0.1, batch_size: int = 4,
                     seed: int = 0, log: Callable[[str], None] = print) -> LearnedResult:
    """Fit the mixing logits on `windows` ([B, W] token ids) with `model` as the function; see the module docstring.

    `model` is any instance of the architecture (its parameters are replaced by the mixed tensors in every call, and
    are not changed). Batches of `batch_size` windows are drawn in a seeded order, cycling.
    """
    from torch.func import functional_call

    device = next(model.parameters()).device
    groups = groups_of(names, granularity)
    group_names = sorted(set(groups.values()))
    gidx = {g: i for i, g in enumerate(group_names)}
    n_models = len(getters)
    stacks: dict[str, torch.Tensor] = {}  # name -> [N, numel] float32 on the device (the frozen ingredients)
    fixed: dict[str, torch.Tensor] = {}  # non-floating tensors: the first ingredient's
    for name in names:
        first = getters[0](name)
        if not first.is_floating_point():
            fixed[name] = first.to(device)
            continue
        stack = torch.empty((n_models, first.numel()), dtype=torch.float32, device=device)
        for i, g in enumerate(getters):
            stack[i].copy_((first if i == 0 else g(name)).reshape(-1))
        stacks[name] = stack
    shapes = {name: tuple(getters[0](name).shape) for name in stacks}
    logits = torch.zeros((len(group_names), n_models), dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=gen)
    pos = 0
    losses: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            if pos + batch_size > len(order):
                order, pos = torch.randperm(windows.shape[0], generator=gen), 0
            batch = windows[order[pos:pos + batch_size]].to(device)
            pos += batch_size
            w = torch.softmax(logits, dim=-1)  # [G, N]
            params = {n: (w[gidx[groups[n]]] @ stacks[n]).view(shapes[n]) for n in stacks}
            params.update(fixed)
            out = functional_call(model, params, args=(), kwargs={"input_ids": batch, "labels": batch,
                                                                  "use_cache": False})
            loss = out.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step == 0 or (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
                log(f"learned soup: step {step + 1}/{steps} loss {losses[-1]:.4f} (ppl {math.exp(losses[-1]):.3f})")
            del out, loss, params
    finally:
        model.train(was_training)
    with torch.no_grad():
        w = torch.softmax(logits, dim=-1).double().cpu()
    weights = {g: [float(x) for x in w[gidx[g]]] for g in group_names}
    return LearnedResult(groups, weights, losses)
