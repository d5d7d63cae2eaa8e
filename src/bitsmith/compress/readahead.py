"""Reading the next tensors of a checkpoint in a background thread while the current one is being computed.

A sweep alternates reading (file -> memory), computing (often on a GPU) and writing; done one after the other, the
reads alone cost a third of an 8B model's sweep on an H100. `ReadAhead` reads tensors in the order the sweep will ask
for them, on a thread of its own (file reads release the GIL), holding at most `max_bytes` of tensors read but not
yet taken. A tensor larger than `max_bytes` is never read ahead: the caller reads it itself, so memory stays at one
such tensor plus `max_bytes`. Any error in the thread just stops the read-ahead: the caller then reads the tensor
itself and gets the ordinary, well-worded error.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch

DEFAULT_READ_AHEAD_BYTES = 512 * 1024**2


class ReadAhead:
    def __init__(self, names: list[str], nbytes: Callable[[str], int], read: Callable[[str, dict], torch.Tensor],
                 max_bytes: int = DEFAULT_READ_AHEAD_BYTES):
        """`read(name, files)` reads one tensor using `files` (the thread's own open file handles)."""
        self._order = [n for n in names if 0 < nbytes(n) <= max_bytes]
        self._pos = {n: i for i, n in enumerate(self._order)}
        self._nbytes, self._read, self._max = nbytes, read, max_bytes
        self._cond = threading.Condition()
        self._ready: dict[str, torch.Tensor] = {}
        self._held = 0  # bytes in _ready
        self._abandoned: set[str] = set()  # names the caller read itself: the thread skips them
        self._next = 0  # index into _order of the tensor the thread reads next
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="bitsmith-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        files: dict = {}
        try:
            while True:
                with self._cond:
                    while not self._stopped and self._next < len(self._order) and (
                            self._order[self._next] in self._abandoned
                            or self._held + self._nbytes(self._order[self._next]) > self._max):
                        if self._order[self._next] in self._abandoned:
                            self._next += 1
                        else:
                            self._cond.wait()
                    if self._stopped or self._next >= len(self._order):
                        return
                    name = self._order[self._next]
                t = self._read(name, files)  # outside the lock: the caller keeps computing meanwhile
                with self._cond:
                    self._next += 1
                    if name in self._abandoned:
                        continue
                    self._ready[name] = t
                    self._held += self._nbytes(name)
                    self._cond.notify_all()
        except Exception:  # the caller falls back to its own read, which reports the problem properly
            pass
        finally:
            for f in files.values():
                f.close()
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def take(self, name: str) -> torch.Tensor | None:
        """The tensor if it was (or is about to be) read ahead; None: read it yourself."""
        with self._cond:
            while True:
                t = self._ready.pop(name, None)
                if t is not None:
                    self._held -= self._nbytes(name)
                    self._cond.notify_all()
                    return t
                pos = self._pos.get(name)
                if self._stopped or pos is None or pos < self._next:
                    return None
                blocked = self._held + self._nbytes(name) > self._max  # untaken tensors fill the budget
                if pos != self._next or blocked:  # asked out of order, or it would never come: do not wait
                    self._abandoned.add(name)
                    self._cond.notify_all()
                    return None
                self._cond.wait()  # the thread is reading it now

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._held = 0
            self._cond.notify_all()
        self._thread.join()


def open_cached(files: dict, path: Path):
    f = files.get(path)
    if f is None:
        f = files[path] = open(path, "rb")
    return f
