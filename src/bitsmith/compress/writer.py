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
import signal
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from .errors import OutputError

_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DEFAULT_SHARD_BYTES = 5 * 1000**3
# Fault injection for the kill-and-resume tests: the process SIGKILLs itself after writing this many groups.
_FAULT_ENV = "BITSMITH_FAULT_KILL_AFTER_GROUPS"
_HEADER_RESERVE_MAX = 256 * 1024
_HEADER_BYTES_PER_TENSOR = 200  # a generous JSON entry: name, dtype, shape, offsets


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
    """Write tensors into `<target>` atomically: use as a context manager; `commit()` at the end publishes.

    Resumable: with a `resume_key` (a fingerprint of the input, the recipe and the settings), every closed shard is
    recorded in `journal.json` inside the partial folder, with the records the caller attached to the groups it
    holds. A later run with the same key keeps those shards and reports them in `completed`, so the caller can skip
    their inputs; anything else in the partial folder is discarded. A run with another key starts afresh.
    """

    JOURNAL = "journal.json"

    def __init__(self, target: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 resume_key: str | None = None, expected_tensors: int | None = None):
        self.target = Path(target).absolute()
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.resume_key = resume_key
        # Header space reserved per shard: enough for every tensor we expect (a shard that needs more is rewritten).
        self._reserve = _HEADER_RESERVE_MAX if expected_tensors is None else \
            min(_HEADER_RESERVE_MAX, 1024 + _HEADER_BYTES_PER_TENSOR * expected_tensors)
        self._reserve += -self._reserve % 8  # keep the data 8-byte aligned
        if self.target.exists() and not overwrite:
            raise OutputError(f"{self.target}: output folder exists (pass --overwrite to replace it)")
        parent = self.target.parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: the output's parent folder does not exist")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{parent}: not writable")
        self.tmp = parent / f".{self.target.name}.bitsmith-partial"
        self._shard_files: list[Path] = []  # in order; the last one is open while _current is set
        self._current: _Shard | None = None
        self._current_records: dict[str, dict] = {}
        self._journal: list[dict] = []
        self.completed: dict[str, dict] = {}  # group key -> record, for groups in shards kept from an earlier run
        self.weight_map: dict[str, int] = {}
        self.bytes_written = 0
        self._groups_written = 0
        self._kill_after = int(os.environ[_FAULT_ENV]) if os.environ.get(_FAULT_ENV) else None

    def __enter__(self) -> "CheckpointWriter":
        try:
            if not self._try_resume():
                if self.tmp.exists():
                    shutil.rmtree(self.tmp)
                self.tmp.mkdir()
        except OSError as e:
            raise _disk_error(e, self.tmp) from None
        return self

    def _try_resume(self) -> bool:
        journal_path = self.tmp / self.JOURNAL
        if self.resume_key is None or not journal_path.is_file():
            return False
        try:
            journal = json.loads(journal_path.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if journal.get("key") != self.resume_key:
            return False
        kept = []
        for entry in journal["shards"]:
            path = self.tmp / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["size"]:
                break
            kept.append(entry)
        keep_names = {e["file"] for e in kept} | {self.JOURNAL}
        for p in self.tmp.iterdir():  # a shard that was being written when the run died, side files...
            if p.name not in keep_names:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for i, entry in enumerate(kept):
            self._shard_files.append(self.tmp / entry["file"])
            for name, nbytes in entry["tensors"].items():
                self.weight_map[name] = i
                self.bytes_written += nbytes
            self.completed.update(entry["records"])
        self._journal = kept
        self._write_journal()
        return True

    def _write_journal(self) -> None:
        if self.resume_key is None:
            return
        tmp = self.tmp / (self.JOURNAL + ".new")
        tmp.write_text(json.dumps({"key": self.resume_key, "shards": self._journal}))
        os.replace(tmp, self.tmp / self.JOURNAL)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        if issubclass(exc_type, KeyboardInterrupt) and self.resume_key is not None:
            if self._current is not None and not self._current.f.closed:
                self._current.f.close()  # keep the closed shards: the same command resumes
            return
        self.abort()

    def abort(self) -> None:
        if self._current is not None and not self._current.f.closed:
            self._current.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- tensors ---------------------------------------------------------------------------------------------------
    def _close_current(self) -> None:
        shard = self._current
        shard.close()
        self._journal.append({
            "file": shard.path.name, "size": shard.path.stat().st_size,
            "tensors": {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in shard.entries.items()},
            "records": self._current_records,
        })
        self._current, self._current_records = None, {}
        self._write_journal()

    def add_group(self, key: str, tensors: dict[str, torch.Tensor], record: dict | None = None) -> None:
        """Write the tensors that one input produced, all in one shard; `record` is kept in the journal under `key`."""
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            if self._current is not None and self._current.offset and self._current.offset + n > self.max_shard_bytes:
                self._close_current()
            if self._current is None:
                self._current = _Shard(self.tmp / f"shard-{len(self._shard_files):05d}.partial", self._reserve)
                self._shard_files.append(self._current.path)
            for name, t in tensors.items():
                if name in self.weight_map:
                    raise ValueError(f"tensor {name!r} written twice")
                self._current.add(name, t)
                self.weight_map[name] = len(self._shard_files) - 1
                self.bytes_written += t.numel() * t.element_size()
            self._current_records[key] = record or {}
            self._groups_written += 1
            if self._kill_after is not None and self._groups_written >= self._kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        except OSError as e:
            self.abort()
            raise _disk_error(e, self.target) from None

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self.add_group(name, {name: t})

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
                self._close_current()
            n = len(self._shard_files)
            names = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for path, final in zip(self._shard_files, names):
                os.replace(path, self.tmp / final)
            (self.tmp / self.JOURNAL).unlink(missing_ok=True)
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
