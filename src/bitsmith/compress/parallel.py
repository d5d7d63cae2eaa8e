"""Producing the output tensors of a sweep: in this process, in worker processes, or across torch.distributed ranks.

Every producer yields `(name, record, tensors)` in the checkpoint's tensor order, so the writer lays out the same
shards whatever the parallelism: the output is byte-identical to a single-process run (passes are deterministic).

- serial: one tensor at a time (memory: the largest tensor).
- workers (`--workers N`): N spawned processes each rebuild the source chain from the recipe and compute tensors
  they are handed; at most 2N results are in flight, so memory is about N tensors plus N runtimes.
- ranks (`torchrun` / `accelerate launch`, world size > 1): tensor i belongs to rank i % world; each rank computes
  its own and sends them to rank 0 in order (objects over torch.distributed: gloo on CPU, nccl on GPU); only rank 0
  writes. Model passes that support ranks (`supports_ranks` on their config: `block_sparse`) run on every rank
  and share their work there (see `calibration.collect_stats(distributed=True)`), so every rank ends with the same
  model and the sweep that follows is shared as above.

Lifecycle: `init_distributed` (once, from the launcher's environment), `finish_distributed` (a barrier, then
`destroy_process_group` on every rank, after the last collective; skipped after an unexpected error, where the
launcher stops the other ranks).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Iterable, Iterator

import torch

Group = tuple[str, dict, dict[str, torch.Tensor]]  # (input name, journal record, output tensors)


def compute_group(source, shapes: dict, name: str, nbytes: Callable) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read one input tensor through the source chain; its output tensors and the record the writer journals."""
    from .formats import check_module_entry

    state = source.read(name)
    if state.packed is None:
        return {}, {name: state.tensor}
    record = {"module": state.module, "entry": check_module_entry(state.module, state.packed.module_entry()),
              "bytes_before": nbytes(*shapes[name]), "bytes_after": state.packed.nbytes}
    return record, {f"{state.module}.{k}": t.contiguous() for k, t in state.packed.tensors.items()}


def serial(source, shapes, names: Iterable[str], nbytes) -> Iterator[Group]:
    for name in names:
        record, tensors = compute_group(source, shapes, name, nbytes)
        yield name, record, tensors
        del record, tensors  # before reading the next one: memory holds one output, not two


# --- worker processes ----------------------------------------------------------------------------------------------

_worker_state: dict = {}


def _worker_init(build: Callable, build_args: tuple) -> None:
    torch.set_num_threads(1)  # N workers share the cores
    _worker_state["source"], _worker_state["shapes"], _worker_state["nbytes"] = build(*build_args)


def _worker_compute(name: str):
    s = _worker_state
    return compute_group(s["source"], s["shapes"], name, s["nbytes"])


def workers(n: int, build: Callable, build_args: tuple, names: list[str]) -> Iterator[Group]:
    """`build(*build_args) -> (source, shapes, nbytes)` runs once in each worker (it must be a module-level function)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # no fork of a process holding threads and open files
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init, initargs=(build, build_args)) as pool:
        pending: deque = deque()
        it = iter(names)
        for name in it:
            pending.append((name, pool.submit(_worker_compute, name)))
            if len(pending) >= 2 * n:
                break
        while pending:
            name, fut = pending.popleft()
            record, tensors = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_worker_compute, nxt)))
            yield name, record, tensors


# --- torch.distributed ranks ---------------------------------------------------------------------------------------

def dist_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun / accelerate set RANK and WORLD_SIZE)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str) -> bool:
    """Join the launcher's process group (nccl for a CUDA device, gloo otherwise); False if one already exists
    (then whoever created it also destroys it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend)
    return True


def finish_distributed() -> None:
    """Every rank, after its last collective: wait for the others, then release the process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str) -> str:
    """The device of this rank: `cuda` (any index) becomes cuda:LOCAL_RANK, one GPU per rank; others unchanged."""
    return f"cuda:{local_rank()}" if torch.device(device).type == "cuda" else device


def active_world() -> tuple[int, int] | None:
    """(rank, world) when a torch.distributed group of more than one rank is initialized, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def comm_device(like: torch.device) -> torch.device:
    """Where tensors must be for the backend: this rank's GPU under nccl, the CPU under gloo."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def send(t: torch.Tensor, dst: int) -> None:
    import torch.distributed as dist

    dist.send(t.to(comm_device(t.device)).contiguous(), dst=dst)


def isend(t: torch.Tensor, dst: int):
    """Start sending `t` to rank `dst`; returns (work, buffer): keep both until `work.wait()`."""
    import torch.distributed as dist

    buf = t.to(comm_device(t.device)).contiguous()
    return dist.isend(buf, dst=dst), buf


def recv(shape, dtype: torch.dtype, src: int, device: torch.device) -> torch.Tensor:
    """A tensor sent by `send` on rank `src`, on `device`."""
    import torch.distributed as dist

    buf = torch.empty(shape, dtype=dtype, device=comm_device(device))
    dist.recv(buf, src=src)
    return buf.to(device)


def broadcast_(t: torch.Tensor, src: int) -> None:
    """Overwrite `t` (contiguous, any dtype) on every rank with its bytes on rank `src`."""
    import torch.distributed as dist

    dev = comm_device(t.device)
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)  # bytes: every backend takes uint8
    if raw.device == dev:
        dist.broadcast(raw, src=src)
    else:
        buf = raw.to(dev)
        dist.broadcast(buf, src=src)
        raw.copy_(buf)


def ranks(source, shapes, names: list[str], nbytes, device: str) -> Iterator[Group]:
    """On rank 0: yields every group in order. On other ranks: computes and sends their share, yields nothing."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    obj_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for i, name in enumerate(names):
        owner = i % world
        if rank == 0:
            if owner == 0:
                record, tensors = compute_group(source, shapes, name, nbytes)
            else:
                box = [None]
                dist.recv_object_list(box, src=owner, device=obj_device)
                record, tensors = box[0]
            yield name, record, tensors
        elif owner == rank:
            record, tensors = compute_group(source, shapes, name, nbytes)
            cpu = {k: t.to("cpu") for k, t in tensors.items()}
            dist.send_object_list([(record, cpu)], dst=0, device=obj_device)
