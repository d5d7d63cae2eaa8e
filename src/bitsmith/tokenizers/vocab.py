"""Vocabularies of different tokenizer families on common ground, and special tokens by role.

Two tokenizers share a token when both have a token for the same text. The stored token strings do not show that
directly, so each token gets a key, the bytes of the text it stands for:

- byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen): each byte is stored as one printable character (the space as `Ġ`,
  the newline as `Ċ`); the key undoes that map, so `Ġthe` -> b" the".
- SentencePiece-style (Gemma, Llama 2, Mistral; BPE or Unigram models with a `▁` word-start marker): `▁` -> b" ";
  with byte fallback, `<0x0A>` -> b"\\n".
- WordPiece (BERT): `##ing` continues a word -> b"ing"; a token without `##` starts one -> b" ing".
- anything else: the token's UTF-8 bytes.

Added tokens keep their text as written (it is never byte-encoded). Special added tokens (`<bos>`, `<|im_end|>`...) get
keys of their own kind, so they only match a special token of exactly the same text, never ordinary text.

The roles bos/eos/unk/pad come from tokenizer_config.json (or special_tokens_map.json), else from config.json's
`<role>_token_id`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..compress.errors import CheckpointError

ROLES = ("bos", "eos", "unk", "pad")

# Files that make up a tokenizer in a Hugging Face folder: all of them are replaced together by a transplant.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json",
})

_SPECIAL = b"\x00special\x00"  # prefix of the keys of special tokens (no ordinary text starts with NUL + this)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE: printable Latin-1 bytes stand for themselves, the other
    68 bytes (control characters, space, DEL, NBSP, soft hyphen) take the characters from U+0100 on, in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(0x100 + extra)
            extra += 1
    return out


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass
class Vocab:
    """A tokenizer's vocabulary as keys (bytes of text), with its special tokens and their roles."""

    tokenizer: object  # tokenizers.Tokenizer
    family: str  # "byte_level", "metaspace", "wordpiece" or "plain"
    tokens: list[str | None]  # id -> token string (None for an id no token has)
    keys: list[bytes | None]  # id -> key (see the module docstring)
    special: frozenset[int]  # ids of special added tokens
    roles: dict[str, int] = field(default_factory=dict)  # "bos" -> id ...
    byte_tokens: frozenset[int] = frozenset()  # ids of byte-fallback tokens <0xNN>

    @property
    def size(self) -> int:
        return len(self.tokens)

    def index(self) -> dict[bytes, int]:
        """key -> id. When several tokens have one key (Gemma's "a" and its byte token <0x61>), the ordinary token
        wins, then the lower id."""
        out: dict[bytes, int] = {}
        for i, key in enumerate(self.keys):
            if key is None:
                continue
            j = out.get(key)
            if j is None or (j in self.byte_tokens and i not in self.byte_tokens):
                out[key] = i
        return out

    def is_special_key(self, key: bytes) -> bool:
        return key.startswith(_SPECIAL)

    def text_of(self, i: int) -> bytes | None:
        """The bytes token i stands for (None for special tokens and holes)."""
        key = self.keys[i]
        return None if key is None or key.startswith(_SPECIAL) else key


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """The tokenizer files present in a model folder."""
    return {p.name: p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name in TOKENIZER_FILES}


def has_tokenizer(files: Mapping[str, object]) -> bool:
    return ("tokenizer.json" in files or "tokenizer.model" in files or "spiece.model" in files
            or "sentencepiece.bpe.model" in files or ("vocab.json" in files and "merges.txt" in files)
            or "vocab.txt" in files)


def _read(src: Path | bytes | str) -> bytes:
    if isinstance(src, Path):
        return src.read_bytes()
    return src.encode() if isinstance(src, str) else bytes(src)


def _load_json(files: Mapping[str, Path | bytes], name: str, where: str) -> dict:
    if name not in files:
        return {}
    try:
        data = json.loads(_read(files[name]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: {name} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def load_vocab(files: Mapping[str, Path | bytes], config: dict | None, where: str) -> Vocab:
    """The vocabulary of the tokenizer in `files` ({file name: path or content}); `config` is the model's config.json
    (for token ids the tokenizer files do not name). `where` names the model in error messages."""
    from tokenizers import Tokenizer

    if not has_tokenizer(files):
        raise CheckpointError(
            f"{where}: no tokenizer (expected tokenizer.json, or tokenizer.model, or vocab.json + merges.txt; found "
            f"{', '.join(sorted(files)) or 'no tokenizer files'})")
    if "tokenizer.json" in files:
        try:
            raw = _read(files["tokenizer.json"]).decode()
            tok = Tokenizer.from_str(raw)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise CheckpointError(f"{where}: tokenizer.json cannot be read: {e}") from None
    else:
        tok = _convert_slow(files, where)
        raw = tok.to_str()
    spec = json.loads(raw)
    family = _family(spec)
    model = spec.get("model") or {}
    byte_fallback = bool(model.get("byte_fallback"))
    size = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab:
        size = max(size, max(vocab.values()) + 1)
    tokens: list[str | None] = [None] * size
    for t, i in vocab.items():
        tokens[i] = t
    added = {a["id"]: a for a in spec.get("added_tokens") or [] if isinstance(a, dict) and "id" in a}
    special = frozenset(i for i, a in added.items() if a.get("special"))
    keys: list[bytes | None] = [None] * size
    byte_tokens = set()
    for i, t in enumerate(tokens):
        if t is None:
            continue
        if i in special:
            keys[i] = _SPECIAL + t.encode()
        elif i in added:
            keys[i] = t.encode()
        else:
            key = _key(t, family, byte_fallback)
            keys[i] = key
            if byte_fallback and _BYTE_TOKEN.fullmatch(t):
                byte_tokens.add(i)
    v = Vocab(tok, family, tokens, keys, special, {}, frozenset(byte_tokens))
    v.roles = _roles(files, config or {}, vocab, where)
    return v


def _convert_slow(files: Mapping[str, Path | bytes], where: str):
    """A fast tokenizer from slow-tokenizer files (SentencePiece model, GPT-2 vocab + merges) through transformers."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bitsmith-tok-") as tmp:
        for name, src in files.items():
            if name in TOKENIZER_FILES:
                if isinstance(src, Path):
                    shutil.copyfile(src, Path(tmp) / name)
                else:
                    (Path(tmp) / name).write_bytes(_read(src))
        try:
            hf = AutoTokenizer.from_pretrained(tmp)
        except Exception as e:  # transformers raises many types here
            raise CheckpointError(f"{where}: the tokenizer files cannot be loaded: {e}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"{where}: the tokenizer cannot be converted to a fast (tokenizers) tokenizer")
    return backend


def _walk(node) -> list[dict]:
    """Every dict inside a tokenizer.json component (Sequence components nest)."""
    out = []
    if isinstance(node, dict):
        out.append(node)
        for v in node.values():
            out += _walk(v)
    elif isinstance(node, list):
        for v in node:
            out += _walk(v)
    return out


def _family(spec: dict) -> str:
    parts = _walk([spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")])
    types = {p.get("type") for p in parts}
    model = spec.get("model") or {}
    if "ByteLevel" in types:
        return "byte_level"
    if model.get("type") == "WordPiece":
        return "wordpiece"
    if "Metaspace" in types or model.get("type") == "Unigram":
        return "metaspace"
    for p in parts:  # SentencePiece converted to BPE: a normalizer/decoder that swaps " " and "▁"
        if p.get("type") == "Replace" and "▁" in json.dumps(p, ensure_ascii=False):
            return "metaspace"
    return "plain"


def _key(t: str, family: str, byte_fallback: bool) -> bytes:
    if family == "byte_level":
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in t)
        except KeyError:
            return t.encode()
    if family == "metaspace":
        if byte_fallback:
            m = _BYTE_TOKEN.fullmatch(t)
            if m:
                return bytes([int(m.group(1), 16)])
        return t.replace("▁", " ").encode()
    if family == "wordpiece":
        return t[2:].encode() if t.startswith("##") else b" " + t.encode()
    return t.encode()


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _roles(files: Mapping[str, Path | bytes], config: dict, vocab: dict[str, int], where: str) -> dict[str, int]:
    tok_cfg = _load_json(files, "tokenizer_config.json", where)
    special_map = _load_json(files, "special_tokens_map.json", where)
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    roles: dict[str, int] = {}
    for role in ROLES:
        for source in (tok_cfg, special_map):
            text = _token_text(source.get(f"{role}_token"))
            if text is not None and text in vocab:
                roles[role] = vocab[text]
                break
        else:
            for cfg in (config, text_cfg):
                value = cfg.get(f"{role}_token_id")
                if isinstance(value, list) and value:
                    value = value[0]
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    roles[role] = value
                    break
    return roles
