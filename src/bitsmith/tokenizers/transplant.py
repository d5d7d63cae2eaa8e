"""`transplant_tokenizer`: give a model another model's tokenizer (checkpoint pass).

The base model B keeps its weights; its vocabulary becomes the donor D's. Rows of the input embedding (and of the
output head, when it is stored apart) are rebuilt for the donor's token ids:

- tokens both vocabularies have (same text, `vocab.py` puts the families on common ground): B's row, copied;
- special tokens by role (bos, eos, unk, pad): the donor's bos gets B's bos row, and so on (`token_map` adds pairs);
- every other token (`method`):
  - `omp` (Orthogonal Matching Pursuit, arXiv 2506.06607): D's row of the token is approximated by k of D's rows of
    shared tokens (`omp.py`); the same coefficients combine B's rows of those tokens. Input embeddings and output head
    are fitted separately (each from D's matching matrix).
  - `mean`: the mean of B's rows; `zero`: zeros; `subword`: the mean of B's rows of the pieces B's own tokenizer
    cuts the token's text into. These are baselines.

A tied base stays tied (one matrix), an untied one stays untied. The output folder holds the donor's tokenizer files
instead of the base's, a config with the new vocab size and the donor's special token ids, a generation config with
those ids, and `transplant_report.json` (also in `ctx.extra["transplant_report"]`): how many tokens were copied,
rebuilt and special-mapped. All other tensors stream through untouched.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from ..compress.checkpoint import CheckpointReader, resolve_model_path
from ..compress.errors import CheckpointError, PlanError
from ..compress.inventory import build_inventory
from ..compress.passes import PassConfig, PassKind, TensorState, register_pass
from ..compress.sources import Source, SourceView
from . import omp as omp_mod
from .vocab import ROLES, TOKENIZER_FILES, Vocab, has_tokenizer, load_vocab, tokenizer_files

log = logging.getLogger("bitsmith")

REPORT_FILE = "transplant_report.json"
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id", "unk": "unk_token_id"}
_GEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class TransplantTokenizer(PassConfig):
    """Replace the model's tokenizer with the donor's, rebuilding embedding and head rows for the new vocabulary."""

    type: Literal["transplant_tokenizer"] = "transplant_tokenizer"
    donor: Optional[str] = Field(None, description="model folder or Hub id whose tokenizer the model gets")
    method: Literal["omp", "mean", "zero", "subword"] = "omp"
    k: int = Field(64, ge=1, le=1024, description="omp: atoms (shared tokens) per new token")
    candidates: Optional[int] = Field(
        256, ge=1, description="omp: atoms searched per step after each re-ranking (null: all, the exact search)")
    batch_size: int = Field(1024, ge=1, description="omp: new tokens solved together")
    token_map: dict[str, str] = Field(
        default_factory=dict, description="donor token -> base token whose rows it copies (beyond the roles)")

    kind = PassKind.CHECKPOINT


# --------------------------------------------------------------------------------------------------------- layout

@dataclass
class _Layout:
    """What the pass reads and writes, found from configs and tensor names before any weight is read."""

    base_vocab: int
    embed: str  # base input embedding tensor
    head: str | None  # base output head tensor, None when tied to the embedding
    head_bias: str | None
    donor_path: Path
    donor_config: dict
    donor_embed: str
    donor_head: str | None  # None: the donor's head is its embedding
    donor_rows: int
    donor_vocab: Vocab
    new_vocab: int

    def rebuilt(self) -> dict[str, str]:
        """{base tensor: donor tensor whose rows drive it}."""
        out = {self.embed: self.donor_embed}
        if self.head is not None:
            out[self.head] = self.donor_head or self.donor_embed
        if self.head_bias is not None:
            out[self.head_bias] = self.donor_head or self.donor_embed
        return out


def _text_config(config: dict) -> dict:
    """The dict holding vocab_size (the config itself, or its text_config for multimodal models)."""
    tc = config.get("text_config")
    if "vocab_size" not in config and isinstance(tc, dict) and "vocab_size" in tc:
        return tc
    return config


def _width(config: dict) -> int | None:
    for cfg in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in _WIDTH_KEYS:
            v = cfg.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _embedding_names(config: dict, tensors: dict, vocab: int, where: str) -> tuple[str, str | None, str | None]:
    """(input embedding, stored output head or None when tied, head bias or None) of a checkpoint."""
    inv = build_inventory(config, tensors)
    embeds = [m for m in inv.modules.values()
              if "Embedding" in " ".join(m.class_names) and m.weight and m.shape and len(m.shape) == 2
              and m.shape[0] == vocab]
    if not embeds:
        rows = [n for n, (shape, _) in tensors.items() if len(shape) == 2 and shape[0] == vocab]
        raise PlanError(
            f"{where}: no input embedding tensor for the config's vocab_size {vocab} (2-D tensors with {vocab} rows: "
            f"{', '.join(rows) or 'none'}); transplant_tokenizer needs the embedding named in the checkpoint")
    if len(embeds) > 1:
        raise PlanError(f"{where}: several embedding tensors with {vocab} rows ({', '.join(m.weight for m in embeds)});"
                        " transplant_tokenizer handles one input embedding")
    embed = embeds[0]
    heads = [m for m in inv.modules.values()
             if m is not embed and "Linear" in m.class_names and m.shape and len(m.shape) == 2 and m.shape[0] == vocab]
    head = next((m.weight for m in heads if m.weight), None)
    bias = None
    if head is not None:
        b = head[: -len("weight")] + "bias"
        bias = b if b in tensors else None
    return embed.weight, head, bias


def _check_other_vocab_tensors(tensors: dict, vocab: int, known: set[str], where: str) -> None:
    others = [n for n, (shape, _) in tensors.items() if n not in known and len(shape) >= 1 and shape[0] == vocab]
    if others:
        raise PlanError(f"{where}: tensors {', '.join(others[:5])} also have {vocab} (vocab_size) rows; "
                        "transplant_tokenizer rebuilds only the input embedding and the output head (and its bias)")


def _analyse(cfg: TransplantTokenizer, view: SourceView) -> _Layout:
    where = "transplant_tokenizer"
    if not cfg.donor:
        raise PlanError(f"{where}: no donor given; set `donor:` in the recipe or pass --set donor=FOLDER_OR_HUB_ID")
    donor_path = resolve_model_path(cfg.donor)
    dwhere = f"{where}: donor {cfg.donor}"
    try:
        donor_config = json.loads((donor_path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{dwhere}: no config.json (not a Hugging Face model folder)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{dwhere}: config.json is not valid JSON: {e}") from None
    files = tokenizer_files(donor_path)
    if not has_tokenizer(files):
        raise CheckpointError(f"{dwhere}: no tokenizer in the folder (expected tokenizer.json, or tokenizer.model, "
                              "or vocab.json + merges.txt); the donor is where the new tokenizer comes from")
    width = _width(donor_config)
    if width is None:
        raise CheckpointError(f"{dwhere}: config.json gives no embedding width (one of {', '.join(_WIDTH_KEYS)}, "
                              "top level or in text_config); it is needed to find the donor's embedding rows")
    donor_vocab = load_vocab(files, donor_config, dwhere)
    reader = CheckpointReader(donor_path)
    dtensors = {n: (i.shape, i.dtype) for n, i in reader.tensors.items()}
    dvocab = _text_config(donor_config).get("vocab_size")
    if not isinstance(dvocab, int):
        candidates = [n for n, (s, _) in dtensors.items() if len(s) == 2 and s[1] == width and "embed" in n]
        if len(candidates) != 1:
            raise CheckpointError(f"{dwhere}: config.json has no vocab_size and no single embedding tensor of width "
                                  f"{width} to take it from")
        dvocab = dtensors[candidates[0]][0][0]
    donor_embed, donor_head, _ = _embedding_names(donor_config, dtensors, dvocab, dwhere)
    if dtensors[donor_embed][0][1] != width:
        raise CheckpointError(f"{dwhere}: embedding {donor_embed} is {list(dtensors[donor_embed][0])}, but config.json "
                              f"says the width is {width}")

    holder = _text_config(view.config)
    base_vocab = holder.get("vocab_size")
    if not isinstance(base_vocab, int):
        raise PlanError(f"{where}: the base config.json has no vocab_size (top level or in text_config)")
    embed, head, head_bias = _embedding_names(view.config, view.tensors, base_vocab, f"{where}: base model")
    _check_other_vocab_tensors(view.tensors, base_vocab, {embed, head, head_bias}, f"{where}: base model")
    for name, (shape, dtype) in view.tensors.items():
        if name in (embed, head, head_bias) and not dtype.is_floating_point:
            raise PlanError(f"{where}: base tensor {name} is {dtype} (packed or quantized?); put transplant_tokenizer"
                            " before passes that pack the embedding or the head")
    for name in (embed, head):
        if name and name.rsplit(".", 1)[0] in view.packed_modules:
            raise PlanError(f"{where}: base tensor {name} is packed; transplant_tokenizer needs it dense")
    new_vocab = max(dvocab, donor_vocab.size)
    return _Layout(base_vocab, embed, head, head_bias, donor_path, donor_config, donor_embed, donor_head, dvocab,
                   donor_vocab, new_vocab)


def _donor_ids(layout: _Layout) -> dict[str, object]:
    """Token ids for the new config: the donor config's, else its tokenizer's roles."""
    dc = _text_config(layout.donor_config)
    out: dict[str, object] = {}
    for role, key in _ID_KEYS.items():
        v = layout.donor_config.get(key, dc.get(key))
        if v is None:
            v = layout.donor_vocab.roles.get(role)
        if v is not None:
            out[key] = v
    return out


def plan(cfg: TransplantTokenizer, view: SourceView) -> SourceView:
    layout = _analyse(cfg, view)
    return _new_view(layout, view)


def _new_view(layout: _Layout, view: SourceView) -> SourceView:
    new = view.copy()
    holder = _text_config(new.config)
    holder["vocab_size"] = layout.new_vocab
    ids = _donor_ids(layout)
    for target in {id(new.config): new.config, id(holder): holder}.values():
        for key in _ID_KEYS.values():
            if key in ids:
                target[key] = ids[key]
            elif key in target:
                del target[key]  # an id into the old vocabulary would be wrong
    for name in layout.rebuilt():
        shape, dtype = new.tensors[name]
        new.tensors[name] = ((layout.new_vocab,) + tuple(shape[1:]), dtype)
    return new


# -------------------------------------------------------------------------------------------------------- matching

@dataclass
class _Matching:
    copy_new: torch.Tensor  # new ids whose rows are copied from base rows copy_base
    copy_base: torch.Tensor
    rebuild: torch.Tensor  # new ids rebuilt by the method (all have a donor row)
    atoms_donor: torch.Tensor  # shared tokens used as OMP atoms: donor ids and the matching base ids
    atoms_base: torch.Tensor
    fill: torch.Tensor  # new ids with no donor row (beyond the donor's embedding) or no token: mean row
    counts: dict = field(default_factory=dict)
    special: dict = field(default_factory=dict)


def _match(base: Vocab, donor: Vocab, layout: _Layout, token_map: dict[str, str]) -> _Matching:
    bidx = base.index()
    base_rows = layout.base_vocab
    new_vocab = layout.new_vocab
    source: dict[int, int] = {}  # new id -> base id
    special: dict[str, dict] = {}
    by_text_d = {t: i for i, t in enumerate(donor.tokens) if t is not None}
    by_text_b = {t: i for i, t in enumerate(base.tokens) if t is not None}
    for dt, bt in token_map.items():  # the user's pairs first: they win over roles and shared text
        if dt not in by_text_d:
            raise PlanError(f"transplant_tokenizer: token_map: {dt!r} is not a token of the donor's tokenizer")
        if bt not in by_text_b or by_text_b[bt] >= base_rows:
            raise PlanError(f"transplant_tokenizer: token_map: {bt!r} is not a token of the base's tokenizer")
        source[by_text_d[dt]] = by_text_b[bt]
    mapped_by_user = len(source)
    user = set(source)
    mapped = 0
    for role in ROLES:
        d, b = donor.roles.get(role), base.roles.get(role)
        if d is None:
            continue
        if d in user:
            special[role] = {"token": donor.tokens[d], "id": d, "note": "set by token_map"}
            continue
        if d in source:  # the donor uses one token for two roles (SmolLM2: pad = eos)
            first = next(r for r, e in special.items() if e.get("id") == d)
            special[role] = {"token": donor.tokens[d], "id": d, "same_as": first}
            continue
        if b is None or b >= base_rows:
            special[role] = {"token": donor.tokens[d], "id": d, "base_token": None,
                             "note": "the base has no token for this role: treated like any other token"}
            continue
        source[d] = b
        special[role] = {"token": donor.tokens[d], "id": d, "base_token": base.tokens[b], "base_id": b}
        mapped += 1
    copied = 0
    rebuild, fill = [], []
    atoms: dict[int, int] = {}  # base id -> donor id
    for i in range(new_vocab):
        key = donor.keys[i] if i < donor.size else None
        if i in source:
            continue
        if key is None or i >= layout.donor_rows:
            fill.append(i)
            continue
        b = bidx.get(key)
        if b is not None and b < base_rows:
            source[i] = b
            copied += 1
            if not donor.is_special_key(key) and b not in atoms:
                atoms[b] = i
        else:
            rebuild.append(i)
    pairs = sorted(source.items())
    atom_pairs = sorted((d, b) for b, d in atoms.items())
    counts = {"copied": copied, "special_mapped": mapped, "token_map": mapped_by_user, "rebuilt": len(rebuild),
              "filled_mean": len(fill), "new_vocab": new_vocab, "base_vocab": base_rows, "atoms": len(atom_pairs)}
    t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return _Matching(t([p[0] for p in pairs]), t([p[1] for p in pairs]), t(rebuild),
                     t([p[0] for p in atom_pairs]), t([p[1] for p in atom_pairs]), t(fill), counts, special)


def _subword_pieces(base: Vocab, donor: Vocab, ids: torch.Tensor) -> list[list[int]]:
    """Base token ids of each donor token's text, cut by the base tokenizer (bytes that are not UTF-8: byte tokens)."""
    bidx = base.index()
    texts, slots, out = [], [], []
    for n, i in enumerate(ids.tolist()):
        raw = donor.text_of(i) or b""
        try:
            texts.append(raw.decode("utf-8"))
            slots.append(n)
            out.append([])
        except UnicodeDecodeError:
            out.append([bidx[bytes([c])] for c in raw if bytes([c]) in bidx])
    if texts:
        encs = base.tokenizer.encode_batch(texts, add_special_tokens=False)
        for n, enc in zip(slots, encs):
            out[n] = [x for x in enc.ids if x not in base.special]
    return out


# ------------------------------------------------------------------------------------------------------------ apply

class TransplantSource:
    """The inner source with the embedding/head rows rebuilt for the donor's vocabulary and its tokenizer files."""

    def __init__(self, cfg: TransplantTokenizer, inner: Source, ctx, layout: _Layout, base_vocab: Vocab):
        self.cfg, self.inner, self.ctx, self.layout, self.base_vocab = cfg, inner, ctx, layout, base_vocab
        self.view = _new_view(layout, inner.view)
        self.matching = _match(base_vocab, layout.donor_vocab, layout, cfg.token_map)
        self._rebuilt: dict[str, torch.Tensor] | None = None
        self.report: dict | None = None

    def names(self) -> list[str]:
        return self.inner.names()

    def read(self, name: str) -> TensorState:
        if name in self.layout.rebuilt():
            return TensorState(name, self._compute()[name])
        return self.inner.read(name)

    def side_files(self) -> dict[str, Path | bytes]:
        self._compute()
        inner = self.inner.side_files()
        out = {k: v for k, v in inner.items() if k not in TOKENIZER_FILES and k != "generation_config.json"}
        out.update(tokenizer_files(self.layout.donor_path))
        out["generation_config.json"] = (json.dumps(self._generation_config(inner), indent=2) + "\n").encode()
        out[REPORT_FILE] = (json.dumps(self.report, indent=2) + "\n").encode()
        return out

    def _generation_config(self, inner: dict) -> dict:
        gen: dict = {}
        if "generation_config.json" in inner:
            src = inner["generation_config.json"]
            try:
                gen = json.loads(src.read_bytes() if isinstance(src, Path) else src)
            except (UnicodeDecodeError, json.JSONDecodeError):
                gen = {}
        donor_gen: dict = {}
        p = self.layout.donor_path / "generation_config.json"
        if p.is_file():
            try:
                donor_gen = json.loads(p.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                donor_gen = {}
        ids = _donor_ids(self.layout)
        for key in _GEN_ID_KEYS:
            value = donor_gen.get(key, ids.get(key))
            if value is None:
                gen.pop(key, None)
            else:
                gen[key] = value
        gen.pop("decoder_start_token_id", None)
        return gen

    # --- the rows ---------------------------------------------------------------------------------------------------
    def _compute(self) -> dict[str, torch.Tensor]:
        if self._rebuilt is not None:
            return self._rebuilt
        cfg, layout, m = self.cfg, self.layout, self.matching
        start = time.time()
        donor_reader = CheckpointReader(layout.donor_path) if cfg.method == "omp" else None
        codes: dict[str, omp_mod.OMPResult] = {}
        omp_info: dict = {}
        pieces = _subword_pieces(self.base_vocab, layout.donor_vocab, m.rebuild) if cfg.method == "subword" else None
        out: dict[str, torch.Tensor] = {}
        for name, donor_name in layout.rebuilt().items():
            B = self.inner.read(name).tensor
            if B.shape[0] != layout.base_vocab:
                raise CheckpointError(f"transplant_tokenizer: base tensor {name} has {B.shape[0]} rows, config "
                                      f"vocab_size is {layout.base_vocab}")
            if cfg.method == "omp" and donor_name not in codes and len(m.rebuild):
                if len(m.atoms_donor) == 0:
                    raise PlanError("transplant_tokenizer: the two vocabularies share no token, so OMP has no atoms;"
                                    " use method mean, zero or subword")
                D = donor_reader.get(donor_name)
                t0, c0 = time.time(), time.process_time()
                device = self.ctx.device if self.ctx is not None and str(self.ctx.device).startswith("cuda") else None
                res = omp_mod.omp(D[m.atoms_donor], D[m.rebuild], cfg.k, candidates=cfg.candidates,
                                  batch_size=cfg.batch_size, device=device,
                                  progress=bool(self.ctx is not None and self.ctx.progress))
                codes[donor_name] = res
                omp_info[donor_name] = {
                    "atoms": int(len(m.atoms_donor)), "targets": int(len(m.rebuild)), "k": min(cfg.k, len(m.atoms_donor)),
                    "candidates": cfg.candidates, "seconds": round(time.time() - t0, 2),
                    "cpu_seconds": round(time.process_time() - c0, 1),  # all threads of this process
                    "device": str(device or omp_mod.default_device()),
                    "relative_residual_mean": round(float(res.residual.mean()), 4),
                    "relative_residual_median": round(float(res.residual.median()), 4),
                }
                del D
            out[name] = self._rows(B, codes.get(donor_name), pieces)
        self._rebuilt = out
        self.report = {
            "donor": layout.donor_path.name if Path(str(cfg.donor)).expanduser().exists() else cfg.donor,
            "method": cfg.method,
            **({"k": cfg.k, "candidates": cfg.candidates} if cfg.method == "omp" else {}),
            "tokenizers": {"base": self.base_vocab.family, "donor": layout.donor_vocab.family},
            **m.counts,
            "tied": layout.head is None,
            "tensors": {n: f"from donor {d}" if cfg.method == "omp" else cfg.method for n, d in layout.rebuilt().items()},
            "special": m.special,
            **({"omp": omp_info} if omp_info else {}),
            "seconds": round(time.time() - start, 2),
        }
        if self.ctx is not None:
            self.ctx.extra["transplant_report"] = self.report
        c = m.counts
        log.info(f"transplant_tokenizer: {c['copied']} tokens copied, {c['rebuilt']} rebuilt ({cfg.method}), "
                 f"{c['special_mapped']} special-mapped, {c['filled_mean']} without a donor row (mean)")
        return out

    def _rows(self, B: torch.Tensor, code: omp_mod.OMPResult | None, pieces) -> torch.Tensor:
        """The new matrix (or bias vector) from the base's: [base_vocab, ...] -> [new_vocab, ...] in B's dtype."""
        m = self.matching
        Bf = B.float()
        keep = torch.ones(Bf.shape[0], dtype=torch.bool)  # the mean leaves out special tokens' rows
        specials = [i for i in self.base_vocab.special if i < Bf.shape[0]]
        if specials:
            keep[torch.tensor(specials)] = False
        mean = Bf[keep].mean(0) if bool(keep.any()) else Bf.mean(0)
        new = mean.expand((self.layout.new_vocab,) + tuple(Bf.shape[1:])).clone()
        new[m.copy_new] = Bf[m.copy_base]
        if len(m.rebuild):
            method = self.cfg.method
            if method == "zero":
                new[m.rebuild] = 0
            elif method == "subword":
                for n, i in enumerate(m.rebuild.tolist()):
                    if pieces[n]:
                        new[i] = Bf[pieces[n]].mean(0)
            elif method == "omp":
                atoms = Bf[m.atoms_base]
                step = 1024  # the gather is [step, k, width] floats
                for lo in range(0, len(m.rebuild), step):
                    new[m.rebuild[lo:lo + step]] = code.combine(atoms, lo, lo + step)
            # mean: already there
        return new.to(B.dtype)


def apply(cfg: TransplantTokenizer, source: Source, ctx) -> TransplantSource:
    layout = _analyse(cfg, source.view)
    side = source.side_files()
    base_files = {k: v for k, v in side.items() if k in TOKENIZER_FILES}
    base_vocab = load_vocab(base_files, source.view.config, "transplant_tokenizer: base model")
    return TransplantSource(cfg, source, ctx, layout, base_vocab)


register_pass(TransplantTokenizer, apply=apply, plan=plan)
