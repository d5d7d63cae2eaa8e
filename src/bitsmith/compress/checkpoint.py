"""Lazy reading of a Hugging Face checkpoint folder.

A checkpoint is a folder with config.json, optional generation_config.json and tokenizer files, and weights in one
`model.safetensors` or several shards listed by `model.safetensors.index.json`. Headers are parsed and checked up
front (so a truncated or lying file fails before any work starts); tensor data is read one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# safetensors dtype codes -> torch dtypes; anything else is refused with the list of known codes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

# Files that travel with the weights (tokenizer, generation config, chat template...). Weights and indexes do not.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|msgpack|h5)$|.*\.index\.json$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # shard file name, relative to the folder
    offset: int = 0  # absolute byte offset of the tensor's data in the file

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header; raise CheckpointError naming the file on any inconsistency."""
    size = path.stat().st_size
    where = f"{path}"
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{where}: truncated safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{where}: truncated or corrupt safetensors header (declares {header_len} header bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where}: corrupt safetensors header (not JSON: {e})") from None
        except _DuplicateKey as e:
            raise CheckpointError(f"{where}: corrupt safetensors header (tensor {e.args[0]!r} appears twice)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: tensor {name!r}: malformed header entry {entry!r}") from None
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{where}: tensor {name!r}: unknown dtype {code!r} (known: {', '.join(SAFETENSORS_DTYPES)})"
            )
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: tensor {name!r}: bad shape {list(shape)}")
        info = TensorInfo(name, shape, SAFETENSORS_DTYPES[code], path.name, 8 + header_len + begin)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (begin, end)) or \
                not 0 <= begin <= end <= data_len:
            raise CheckpointError(
                f"{where}: tensor {name!r}: data offsets [{begin}, {end}] outside the file's {data_len} data bytes"
                " (truncated or corrupt file)"
            )
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{where}: tensor {name!r}: {end - begin} bytes stored but shape {list(shape)} {code} needs {info.nbytes}"
            )
        infos[name] = info
    return infos


def resolve_model_path(model: str | os.PathLike, allow_download: bool = True) -> Path:
    """A local folder, or a Hub repo id downloaded (safetensors and side files only) into the HF cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder (a checkpoint is a folder with config.json)")
        return path
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) is not None
    if not (looks_like_repo and allow_download):
        raise CheckpointError(f"{model}: no such folder (and not a Hub repo id of the form org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                  "*.jinja", "*.md", "LICENSE*", "NOTICE*",
                                                                  "USE_POLICY*"]))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{model}: not a local folder, and the Hugging Face Hub cannot be reached (offline?) and the repo is not"
            " in the local cache"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{model}: no such repository on the Hugging Face Hub (or it is private)") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{model}: download from the Hugging Face Hub failed: {e}") from None


class CheckpointReader:
    """Read-only, lazy view of a checkpoint folder. Never writes into the folder."""

    def __init__(self, model: str | os.PathLike, allow_pickle: bool = False):
        self.path = resolve_model_path(model)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json (not a Hugging Face model folder)")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_path}: not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config_path}: not a JSON object")
        self.allow_pickle = allow_pickle
        self._pickle_state: dict[str, torch.Tensor] | None = None
        self.tensors: dict[str, TensorInfo] = self._index()
        self._open_file: tuple[str, object] | None = None
        self._ahead = None  # a ReadAhead while one runs

    # --- discovery -----------------------------------------------------------------------------------------------
    def _index(self) -> dict[str, TensorInfo]:
        index_path = self.path / SAFETENSORS_INDEX
        if index_path.is_file():
            return self._read_sharded(index_path)
        single = self.path / SAFETENSORS_SINGLE
        if single.is_file():
            return read_safetensors_header(single)
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        if len(others) == 1:
            return read_safetensors_header(self.path / others[0])
        if others:
            raise CheckpointError(
                f"{self.path}: several .safetensors files ({', '.join(others)}) but no {SAFETENSORS_INDEX}"
            )
        if (self.path / PICKLE_SINGLE).is_file() or (self.path / PICKLE_INDEX).is_file():
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{self.path}: weights are pickle files (pytorch_model.bin), which can run arbitrary code when"
                    " loaded; convert them to safetensors, or pass --allow-pickle if you trust their source"
                )
            return self._read_pickle()
        raise CheckpointError(f"{self.path}: no weights found (expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")

    def _read_sharded(self, index_path: Path) -> dict[str, TensorInfo]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: malformed index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: malformed index ('weight_map' is not an object)")
        infos: dict[str, TensorInfo] = {}
        by_file: dict[str, dict[str, TensorInfo]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or "/" in file or file.startswith(".."):
                raise CheckpointError(f"{index_path}: tensor {name!r} points at a bad file name {file!r}")
            if file not in by_file:
                shard = self.path / file
                if not shard.is_file():
                    raise CheckpointError(f"{index_path}: tensor {name!r} is in {file}, which is missing")
                by_file[file] = read_safetensors_header(shard)
            if name not in by_file[file]:
                raise CheckpointError(f"{index_path}: tensor {name!r} is listed in {file} but is not in that file")
            infos[name] = by_file[file][name]
        return infos

    def _read_pickle(self) -> dict[str, TensorInfo]:
        files = [PICKLE_SINGLE]
        if (self.path / PICKLE_INDEX).is_file():
            files = sorted(set(json.loads((self.path / PICKLE_INDEX).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        infos: dict[str, TensorInfo] = {}
        for file in files:
            # weights_only=True still refuses arbitrary classes; mmap keeps it lazy where the file allows.
            part = torch.load(self.path / file, map_location="cpu", weights_only=True, mmap=True)
            for name, t in part.items():
                state[name] = t
                infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, file)
        self._pickle_state = state
        return infos

    # --- access ----------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor into memory (a fresh CPU tensor, never a view of the file).

        Plain reads at the offset the checked header gives, not a memory map: a map would keep every page touched
        resident in this process, so peak memory would grow with the shard instead of the largest tensor.
        """
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if self._pickle_state is not None:
            return self._pickle_state[name].clone()
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._ahead is not None:
            t = self._ahead.take(name)
            if t is not None:
                return t
        if self._open_file is None or self._open_file[0] != info.file:
            self._close_file()
            self._open_file = (info.file, open(self.path / info.file, "rb"))
        return self._read(info, self._open_file[1])

    def _read(self, info: TensorInfo, f) -> torch.Tensor:
        buf = bytearray(info.nbytes)
        f.seek(info.offset)
        if f.readinto(buf) != info.nbytes:
            raise CheckpointError(f"{self.path / info.file}: tensor {info.name!r} is cut short (file truncated?)")
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def read_ahead(self, names: list[str], max_bytes: int | None = None) -> None:
        """From now on, read `names` (in this order) ahead of `get` on a background thread, holding at most
        `max_bytes` (default 512 MiB) of tensors not yet asked for. `close()` stops it."""
        from .readahead import DEFAULT_READ_AHEAD_BYTES, ReadAhead, open_cached

        self.stop_read_ahead()
        if self._pickle_state is not None:
            return
        known = [n for n in names if n in self.tensors]
        self._ahead = ReadAhead(known, lambda n: self.tensors[n].nbytes,
                                lambda n, files: self._read(self.tensors[n],
                                                            open_cached(files, self.path / self.tensors[n].file)),
                                DEFAULT_READ_AHEAD_BYTES if max_bytes is None else max_bytes)

    def stop_read_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors in file order (one shard open at a time)."""
        for name in sorted(self.tensors, key=lambda n: (self.tensors[n].file, n)):
            yield name, self.get(name)

    def side_files(self) -> list[Path]:
        """Everything in the folder that is not weights: tokenizer, generation config, templates, README."""
        out = []
        for p in sorted(self.path.iterdir()):
            if p.is_file() and not _WEIGHT_FILE.match(p.name) and p.name not in ("config.json", "recipe.yaml"):
                out.append(p)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        self.stop_read_ahead()
        self._close_file()

    def _close_file(self) -> None:
        if self._open_file is not None:
            self._open_file[1].close()
        self._open_file = None
