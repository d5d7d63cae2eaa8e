"""Calibration data for model passes: token samples from text, and input-activation statistics of Linear layers.

`load_text(source)`: the text of a UTF-8 file, or of a local `datasets` dataset saved with `save_to_disk` (its
`text_field` column, rows joined by blank lines; `split` picks a split of a DatasetDict). `None` means the small
text sample bundled with bitsmith (a chapter of Persuasion), so recipes work out of the box; pass a real corpus for
real work.

`sample_tokens(text, tokenizer, samples, seq_len, seed)`: the text is tokenized once (no special tokens); `samples`
windows of `seq_len` tokens start at offsets drawn without replacement from a seeded generator (with replacement
only when the text has fewer distinct offsets than samples). When the tokenizer puts BOS first (Gemma, Llama), each
sample is BOS + `seq_len - 1` text tokens, as the model saw in training. Same text, tokenizer, arguments -> same
samples, on any machine.

`collect_stats(model, modules, batches)`: forward pre-hooks on the named Linear modules accumulate, over every
calibration token, the sum of squared inputs per input feature (`sumsq`, what Wanda's ||X_j||_2 is the root of)
and optionally the Gram matrix X^T X (for least-squares refits, GPTQ-style Hessians). Modules that receive the very
same input tensor (q/k/v projections, gate/up) share one Gram matrix instead of holding copies.

Summation order: each batch's statistics are computed as a partial sum (its `sumsq` in float64, its X^T X as one
float32 product) and added to the running totals batch after batch, totals = ((0 + p_0) + p_1) + ..., in batch
order. `collect_stats(..., distributed=True)` under torch.distributed (world W > 1) keeps exactly that order, so
its totals are bitwise those of one process: batch j runs on rank j % W; in round k (batches kW .. kW+W-1) rank 0
adds its own partial of a module and then, inside the same forward hook, receives and adds the partials of ranks
1, 2, ... for that module (point-to-point, module by module, in hook order). No rank ever holds more than one
module's partials besides the totals (rank 0: the totals plus two partials of one module; other ranks: one
partial); the price is one [K, K] product per batch into a temporary instead of an in-place `addmm_`, and on rank
0 the W - 1 received partials per module per round. Each partial travels after a small header (module, call
number, whether a Gram follows, token count) that rank 0 checks against its own call: a model whose forward calls
different modules on different batches (experts routed per token) gets a clear error, not mixed-up sums. Only rank
0 returns the statistics (the others return {}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field

from .errors import BitsmithError, RecipeError

BUNDLED_TEXT = "bundled sample (bitsmith/compress/data/sample.txt)"


# --------------------------------------------------------------------------------------------------------- text

def bundled_text_path() -> Path:
    return Path(__file__).parent / "data" / "sample.txt"


def load_text(source: str | Path | None, *, text_field: str = "text", split: str | None = None,
              where: str = "calibration") -> str:
    """The calibration text of `source` (file, local `datasets` folder, or None for the bundled sample)."""
    if source is None:
        return bundled_text_path().read_text(encoding="utf-8")
    p = Path(source).expanduser()
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"{where}: {p} is not UTF-8 text (byte {e.start})") from None
    if p.is_dir():
        return _dataset_text(p, text_field, split, where)
    raise RecipeError(f"{where}: text {str(source)!r} is neither a text file nor a local `datasets` folder")


def _dataset_text(path: Path, text_field: str, split: str | None, where: str) -> str:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency of the project's environment
        raise RecipeError(f"{where}: {path} is a folder; reading a `datasets` dataset needs the `datasets` package")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(f"{where}: {path} is not a dataset saved with `save_to_disk` ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            split = "train" if "train" in ds else names[0]
        if split not in ds:
            raise RecipeError(f"{where}: {path} has no split {split!r} (splits: {', '.join(names)})")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise RecipeError(f"{where}: {path} has no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds[text_field] if isinstance(t, str) and t)


def check_text_source(source: str | None, where: str) -> None:
    """Plan-time check that a text source exists (no reading)."""
    if source is None:
        return
    p = Path(source).expanduser()
    if not (p.is_file() or p.is_dir()):
        raise RecipeError(f"{where}: text {source!r} does not exist (a UTF-8 text file or a `datasets` folder saved"
                          " with save_to_disk; leave it out to use the bundled sample)")


# ------------------------------------------------------------------------------------------------------ samples

def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    return bool(ids) and ids[0] == bos and len(ids) > len(tokenizer("x", add_special_tokens=False)["input_ids"])


def sample_tokens(text: str, tokenizer, samples: int, seq_len: int, seed: int = 0, where: str = "calibration"
                  ) -> torch.Tensor:
    """LongTensor [samples, seq_len] of token windows from `text` (see the module docstring)."""
    if samples < 1 or seq_len < 2:
        raise RecipeError(f"{where}: samples must be >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    bos = tokenizer_adds_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n_starts = ids.numel() - body + 1
    if n_starts < 1:
        raise RecipeError(f"{where}: the calibration text has {ids.numel()} tokens, fewer than seq_len {seq_len};"
                          " use a longer text or a smaller seq_len")
    g = torch.Generator().manual_seed(seed)
    if n_starts >= samples:
        starts = torch.randperm(n_starts, generator=g)[:samples]
    else:
        starts = torch.randint(0, n_starts, (samples,), generator=g)
    out = torch.stack([ids[s:s + body] for s in starts.tolist()])
    if bos:
        out = torch.cat([torch.full((samples, 1), tokenizer.bos_token_id, dtype=torch.long), out], dim=1)
    return out


def load_tokenizer(path: str | Path | None, where: str):
    """A tokenizer from a model folder (no remote code); a clear error when there is none."""
    if path is None:
        raise RecipeError(f"{where}: calibration needs a tokenizer: run it through `bitsmith compress` (the input"
                          " folder's tokenizer is used) or set `tokenizer:` to a folder that has one")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{where}: no usable tokenizer in {path} ({e})") from None


def calibration_batches(source: str | None, tokenizer, samples: int, seq_len: int, seed: int = 0, *,
                        text_field: str = "text", split: str | None = None, where: str = "calibration"
                        ) -> torch.Tensor:
    """Load the text of `source` and sample [samples, seq_len] tokens from it."""
    return sample_tokens(load_text(source, text_field=text_field, split=split, where=where), tokenizer, samples,
                         seq_len, seed, where)


# -------------------------------------------------------------------------------------------------------- stats

@dataclass
class LinearStats:
    """Input statistics of one Linear over the calibration tokens."""

    sumsq: torch.Tensor  # float64 [K]: sum over tokens of x_j^2
    tokens: int = 0
    gram: torch.Tensor | None = None  # float32 [K, K]: sum over tokens of x x^T (shared between same-input modules)
    shares_gram_with: str | None = None

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 over the calibration tokens, float32 [K] (Wanda's activation norm)."""
        return self.sumsq.sqrt().to(torch.float32)


@dataclass
class _Collector:
    stats: dict[str, LinearStats] = field(default_factory=dict)
    gram_for: set = field(default_factory=set)
    first_batch: bool = True
    seen: dict = field(default_factory=dict)  # id(input) -> (module name, input) during the first batch
    batch: int = 0  # index of the batch being run
    n_batches: int = 0
    rank: int = 0
    world: int = 1  # > 1: batches shared between ranks, partial sums gathered on rank 0 in batch order
    index: dict = field(default_factory=dict)  # module name -> position in the targets (message headers)
    calls: int = 0  # hook calls so far in this batch

    def add(self, name: str, st: LinearStats, sumsq: torch.Tensor, tokens: int, gram: torch.Tensor | None) -> None:
        """Add one batch's partial sums of one module (see the module docstring for the distributed order)."""
        from . import parallel

        if self.world == 1:
            self._accumulate(st, sumsq, tokens, gram)
            return
        self.calls += 1
        head = [self.index[name], self.calls, int(gram is not None), tokens]
        if self.rank != 0:  # rank 0 adds it in its place
            parallel.send(torch.tensor(head, dtype=torch.int64, device=sumsq.device), 0)
            parallel.send(sumsq, 0)
            if gram is not None:
                parallel.send(gram, 0)
            return
        self._accumulate(st, sumsq, tokens, gram)
        k = sumsq.shape[0]
        for peer in self._peers():
            got = self._header(peer, head, sumsq.device)
            part = parallel.recv((k,), torch.float64, peer, sumsq.device)
            g = parallel.recv((k, k), torch.float32, peer, sumsq.device) if gram is not None else None
            self._accumulate(st, part, got[3], g)

    def end_batch(self, device: torch.device) -> None:
        """After each forward: an end mark from every other rank of the round, so that a rank whose forward called
        more or fewer modules is caught here instead of leaving rank 0 waiting."""
        from . import parallel

        if self.world == 1:
            return
        head = [-1, self.calls + 1, 0, 0]
        if self.rank != 0:
            parallel.send(torch.tensor(head, dtype=torch.int64, device=device), 0)
            return
        for peer in self._peers():
            self._header(peer, head, device)

    def _peers(self) -> range:
        """The ranks whose batches complete rank 0's round, in batch order."""
        return range(1, min(self.world, self.n_batches - self.batch))

    def _header(self, peer: int, want: list[int], device: torch.device) -> list[int]:
        from . import parallel

        got = parallel.recv((4,), torch.int64, peer, device).tolist()
        if got[:3] != want[:3]:  # the ranks' forwards called different modules: refuse, never mix them up
            names = list(self.index)

            def what(h):
                return "the end of its forward" if h[0] < 0 else f"{names[h[0]]} (hook call {h[1]})"
            raise BitsmithError(
                f"calibration on {self.world} ranks: in batch {self.batch + peer} rank {peer} reached {what(got)}"
                f" where rank 0, in batch {self.batch}, reached {what(want)}; the forward calls different modules"
                " on different batches (experts chosen per token?): run this pass in one process")
        return got

    @staticmethod
    def _accumulate(st: LinearStats, sumsq: torch.Tensor, tokens: int, gram: torch.Tensor | None) -> None:
        st.sumsq += sumsq
        st.tokens += tokens
        if gram is not None:
            if st.gram is None:
                st.gram = torch.zeros_like(gram)
            st.gram += gram


@torch.no_grad()
def collect_stats(model: torch.nn.Module, modules: Iterable[str], batches: torch.Tensor, *, batch_size: int = 4,
                  gram: bool | Iterable[str] = False, device: str | torch.device | None = None,
                  progress: bool = False, desc: str = "calibration", distributed: bool = False
                  ) -> dict[str, LinearStats]:
    """Run the calibration tokens [S, L] through `model` and return {module name: LinearStats}.

    `gram`: True for every module, or the names that need X^T X. `device` defaults to the model's.
    `distributed`: under an initialized torch.distributed group of more than one rank, share the batches between
    the ranks (every rank must call this with the same model and batches); rank 0 returns the statistics, bitwise
    equal to a one-process run on the same kind of device, the other ranks return {}. Without such a group it
    changes nothing.
    """
    from tqdm.auto import tqdm

    from . import parallel

    names = list(modules)
    named = dict(model.named_modules())
    missing = [n for n in names if n not in named]
    if missing:
        raise BitsmithError(f"{desc}: no modules named {missing[:4]} in the model")
    want_gram = set(names) if gram is True else set(gram or ())
    col = _Collector(gram_for=want_gram, index={n: i for i, n in enumerate(names)})
    ranks = parallel.active_world() if distributed else None
    if ranks is not None:
        col.rank, col.world = ranks
    dev = torch.device(device) if device is not None else next(model.parameters()).device

    def hook_for(name: str):
        def hook(mod, args):
            x = args[0]
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # [tokens, K]
            st = col.stats.get(name)
            if st is None:
                st = col.stats[name] = LinearStats(torch.zeros(x2.shape[1], dtype=torch.float64, device=x2.device))
            if name in col.gram_for and col.first_batch:
                owner = col.seen.get(id(x))
                if owner is not None and owner[1] is x:
                    st.shares_gram_with = owner[0]
                else:
                    col.seen[id(x)] = (name, x)
            part = x2.t() @ x2 if name in col.gram_for and st.shares_gram_with is None else None  # [K, K]
            col.add(name, st, x2.pow(2).sum(0, dtype=torch.float64), x2.shape[0], part)
        return hook

    handles = [named[n].register_forward_pre_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        starts = list(range(0, batches.shape[0], batch_size))
        col.n_batches = len(starts)
        mine = [j for j in range(len(starts)) if j % col.world == col.rank]
        for j in tqdm(mine, desc=desc, disable=not progress, leave=False):
            col.batch, col.calls = j, 0
            model(input_ids=batches[starts[j]:starts[j] + batch_size].to(dev), use_cache=False)
            col.end_batch(dev)
            if col.first_batch:
                col.first_batch = False
                col.seen.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if col.rank != 0:
        return {}
    for n, st in col.stats.items():
        if st.shares_gram_with is not None:
            st.gram = col.stats[st.shares_gram_with].gram
    not_reached = [n for n in names if n not in col.stats]
    if not_reached:
        raise BitsmithError(f"{desc}: the calibration forward never reached {len(not_reached)} targeted modules"
                            f" (e.g. {', '.join(not_reached[:3])}); they cannot get activation statistics")
    return col.stats


def activation_bytes(stats: dict[str, LinearStats]) -> int:
    """Memory held by the statistics (Gram matrices counted once)."""
    seen, total = set(), 0
    for st in stats.values():
        total += st.sumsq.numel() * 8
        if st.gram is not None and id(st.gram) not in seen:
            seen.add(id(st.gram))
            total += st.gram.numel() * 4
    return total


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(gram + ridge * mean(diag) * I)^-1 rhs by Cholesky (float64); a larger ridge if the factorization fails."""
    g = gram.to(torch.float64)
    n = g.shape[0]
    if n == 0:
        return rhs.new_zeros(rhs.shape)
    scale = g.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(n, dtype=torch.float64, device=g.device)
    lam = ridge
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(g + lam * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.to(torch.float64), L).to(rhs.dtype)
        lam = max(lam * 10, 1e-6)
    raise BitsmithError("least-squares refit: the calibration Gram matrix is not positive definite even with a large"
                        " ridge; use more calibration samples")


# ---------------------------------------------------------------------------------------------- recipe settings


class CalibrationSettings(BaseModel):
    """The calibration keys of a recipe, defined once for every calibrating pass: where the text comes from, how
    it is sampled (`samples` windows of `seq_len` tokens, seeded) and batched, and which tokenizer cuts it.

    `rounding: gptq` nests them (`calibration: {...}`, `bitsmith.quant.gptq.Calibration`, larger defaults);
    block_sparse, recover and rf8_gptq take them at the top level of the pass (`CalibrationFields` in
    `bitsmith.prune.block_sparse`, these defaults).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = Field(None, description="calibration text: a UTF-8 file or a local `datasets` folder"
                                                " (save_to_disk); default: the small sample bundled with bitsmith")
    text_field: str = "text"
    split: str | None = None
    samples: int = Field(32, ge=1, description="calibration sequences")
    seq_len: int = Field(256, ge=2, description="tokens per calibration sequence")
    seed: int = 0
    batch_size: int = Field(4, ge=1, description="sequences per forward")
    tokenizer: str | None = Field(None, description="folder with the tokenizer; default: the input checkpoint")
