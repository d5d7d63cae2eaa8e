"""Incremental, atomic writing of a sharded safetensors checkpoint.

Tensors are written to disk as they arrive (memory stays at one tensor): each shard file starts with a reserved,
space-padded header region that is filled in when the shard closes (safetensors allows trailing spaces in the header
JSON); if the real header outgrows the reservation, the shard is rewritten once with a larger one.
Everything goes into a temporary folder beside the target, renamed into place only when complete, so a failed or
killed run never leaves a folder that looks finished.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from .errors import OutputError

_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DEFAULT_SHARD_BYTES = 5 * 1000**3
_HEADER_RESERVE = 256 * 1024


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', 1000000 -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise OutputError(f"shard size {text!r}: expected a size like 2GB, 500MB or 4GiB") from None


def _disk_error(e: OSError, path: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full while writing the output (the partial output was removed)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: cannot write the output here ({e.strerror})")
    return OutputError(f"{path}: writing the output failed: {e}")


class _Shard:
    def __init__(self, path: Path, reserve: int):
        self.path = path
        self.reserve = reserve
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.f = open(path, "wb")
        self.f.write(b"\0" * (8 + reserve))

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        n = t.numel() * t.element_size()
        self.f.write(memoryview(raw) if n else b"")
        self.entries[name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.offset, self.offset + n]}
        self.offset += n

    def close(self) -> None:
        header = json.dumps(self.entries, separators=(",", ":")).encode()
        if len(header) <= self.reserve:
            self.f.seek(0)
            self.f.write(len(header.ljust(self.reserve)).to_bytes(8, "little"))
            self.f.write(header.ljust(self.reserve, b" "))
            self.f.close()
            return
        # Rare: the header outgrew its reservation; rewrite the shard with an exact header.
        self.f.close()
        pad = (8 - len(header) % 8) % 8
        tmp = self.path.with_suffix(".rewrite")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            dst.write((len(header) + pad).to_bytes(8, "little"))
            dst.write(header + b" " * pad)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 64 * 1024 * 1024)
        os.replace(tmp, self.path)


class CheckpointWriter:
    """Write tensors into `<target>` atomically: use as a context manager; `commit()` at the end publishes."""

    def __init__(self, target: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False):
        self.target = Path(target).absolute()
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        if self.target.exists() and not overwrite:
            raise OutputError(f"{self.target}: output folder exists (pass --overwrite to replace it)")
        parent = self.target.parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: the output's parent folder does not exist")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{parent}: not writable")
        self.tmp = parent / f".{self.target.name}.bitsmith-partial"
        self._shards: list[_Shard] = []
        self._current: _Shard | None = None
        self.weight_map: dict[str, int] = {}
        self.bytes_written = 0

    def __enter__(self) -> "CheckpointWriter":
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise _disk_error(e, self.tmp) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        for s in self._shards:
            if not s.f.closed:
                s.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- tensors ---------------------------------------------------------------------------------------------------
    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map:
            raise ValueError(f"tensor {name!r} written twice")
        n = t.numel() * t.element_size()
        try:
            if self._current is None or (self._current.offset and self._current.offset + n > self.max_shard_bytes):
                if self._current is not None:
                    self._current.close()
                self._current = _Shard(self.tmp / f"shard-{len(self._shards):05d}.partial", _HEADER_RESERVE)
                self._shards.append(self._current)
            self._current.add(name, t)
        except OSError as e:
            self.abort()
            raise _disk_error(e, self.target) from None
        self.weight_map[name] = len(self._shards) - 1
        self.bytes_written += n

    # --- side files --------------------------------------------------------------------------------------------------
    def write_text(self, rel: str, text: str) -> None:
        try:
            (self.tmp / rel).write_text(text)
        except OSError as e:
            raise _disk_error(e, self.tmp / rel) from None

    def write_json(self, rel: str, obj) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def copy_file(self, src: Path, rel: str | None = None) -> None:
        try:
            shutil.copy2(src, self.tmp / (rel or src.name))
        except OSError as e:
            raise _disk_error(e, self.tmp) from None

    # --- finish ------------------------------------------------------------------------------------------------------
    def finish_shards(self) -> list[str]:
        """Close shards, give them their final names and write the index; returns the shard file names."""
        try:
            if self._current is not None:
                self._current.close()
                self._current = None
            n = len(self._shards)
            names = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for shard, final in zip(self._shards, names):
                os.replace(shard.path, self.tmp / final)
            if n > 1:
                index = {"metadata": {"total_size": self.bytes_written},
                         "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
                self.write_json(SAFETENSORS_INDEX, index)
            return names
        except OSError as e:
            raise _disk_error(e, self.tmp) from None

    def commit(self) -> Path:
        """Publish the folder: the temporary folder is renamed onto the target (an old one is replaced if allowed)."""
        old = None
        try:
            if self.target.exists():
                if not self.overwrite:
                    raise OutputError(f"{self.target}: output folder appeared while working (not overwritten)")
                old = self.target.parent / f".{self.target.name}.bitsmith-old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.target, old)
            os.replace(self.tmp, self.target)
        except OSError as e:
            raise _disk_error(e, self.target) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target
