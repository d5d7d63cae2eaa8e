"""Plan, then run: validate a whole recipe against a checkpoint before any weight is read, then stream it.

Plan: for every pass in order, which modules it changes and which it skips (with the reason); errors for targets
that match nothing, passes in an impossible order, shapes that contradict the config. Run: consecutive tensor
passes fuse into one sweep; model passes materialize the model; checkpoint passes swap the source. The writer pulls
one tensor at a time through that chain and writes it, so memory stays near the largest tensor for tensor passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from .checkpoint import CheckpointReader
from .errors import PlanError
from .formats import QUANT_CONFIG_VERSION, QUANT_METHOD
from .inventory import Inventory, build_inventory, select
from .passes import PassConfig, PassKind, handler_for
from .recipe import Recipe
from .sources import CheckpointSource, FusedStep, ModelSource, Source, SourceView, SweepSource, materialize
from .writer import DEFAULT_SHARD_BYTES, CheckpointWriter

log = logging.getLogger("bitsmith")


@dataclass
class PassPlan:
    index: int
    config: PassConfig
    targets: dict[str, tuple[str, str]] = field(default_factory=dict)  # weight name -> (module, class)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> reason

    @property
    def label(self) -> str:
        return f"passes[{self.index}] ({self.config.type})"


@dataclass
class Plan:
    recipe: Recipe
    passes: list[PassPlan]
    inventory: Inventory
    final_view: SourceView

    def describe(self) -> str:
        lines = [f"architecture: {self.inventory.architecture}; {len(self.inventory.modules)} modules with weights"]
        lines += [f"note: {n}" for n in self.inventory.notes]
        for p in self.passes:
            kind = p.config.kind.value
            if kind == "tensor" or p.targets:
                lines.append(f"{p.label}: {kind} pass, {len(p.targets)} modules, {len(p.skipped)} skipped")
            else:
                lines.append(f"{p.label}: {kind} pass")
            for mod, reason in p.skipped.items():
                lines.append(f"    skipped {mod}: {reason}")
        return "\n".join(lines)


@dataclass
class PassContext:
    """What a pass may use besides its config: the input checkpoint, the device, progress and logging."""

    input_path: Path | None = None
    device: str = "cpu"
    progress: bool = True
    plan: Plan | None = None
    extra: dict = field(default_factory=dict)
    distributed: bool = False  # every torch.distributed rank runs the model passes (those with `supports_ranks`)

    def log(self, msg: str) -> None:
        log.info(msg)


def make_plan(recipe: Recipe, source: Source) -> Plan:
    view = source.view.copy()
    inventory = build_inventory(view.config, view.tensors, set(view.packed_modules))
    first_inventory = inventory
    plans: list[PassPlan] = []
    packed_by: dict[str, str] = {}  # module -> label of the pass that packed it
    for i, cfg in enumerate(recipe.passes):
        handler = handler_for(cfg)
        pp = PassPlan(i, cfg)
        where = f"{recipe.source}: {pp.label}"
        if cfg.kind is PassKind.CHECKPOINT:
            if handler.plan is not None:
                view = handler.plan(cfg, view)
                inventory = build_inventory(view.config, view.tensors, set(view.packed_modules))
        elif cfg.kind is PassKind.TENSOR or cfg.packs:  # a packing model pass (gptq rounding) selects like one
            if cfg.kind is PassKind.MODEL and (packed_by or view.packed_modules):
                first = next(iter(packed_by.values()), "the input checkpoint")
                raise PlanError(f"{where}: a model pass cannot follow {first}, which packs weights;"
                                " put model passes before packing passes")
            chosen, skipped = select(inventory, cfg.targets, cfg.ignore, where)
            for m in chosen:
                if m.shape is not None and 0 in m.shape:
                    skipped[m.name] = f"empty weight (shape {list(m.shape)})"
            if handler.plan is not None:
                skipped.update(handler.plan(cfg, [m for m in chosen if m.name not in skipped]))
            already = [m.name for m in chosen if m.name in packed_by and m.name not in skipped]
            if already and not getattr(cfg, "accepts_packed", False):
                raise PlanError(
                    f"{where}: {len(already)} modules were already packed by {packed_by[already[0]]}"
                    f" (e.g. {', '.join(already[:4])}); put this pass before the packing pass, or ignore them"
                )
            for name in view.packed_modules:
                skipped.setdefault(name, "already packed in the input checkpoint")
            for m in chosen:
                if m.name not in skipped:
                    pp.targets[m.weight] = (m.name, m.class_name)
                    if cfg.packs:
                        packed_by[m.name] = pp.label
            pp.skipped = skipped
            if not pp.targets:
                raise PlanError(f"{where}: every module its targets match is skipped:\n"
                                + "\n".join(f"  {k}: {v}" for k, v in skipped.items()))
        else:  # model pass
            if packed_by or view.packed_modules:
                first = next(iter(packed_by.values()), "the input checkpoint")
                raise PlanError(f"{where}: a model pass cannot follow {first}, which packs weights;"
                                " put model passes before packing passes")
            if handler.plan is not None:
                handler.plan(cfg, view, inventory)
        plans.append(pp)
    return Plan(recipe, plans, first_inventory, view)


@dataclass
class Summary:
    output: Path
    seconds: float
    input_bytes: int
    output_bytes: int
    linear_bytes_before: int
    linear_bytes_after: int
    tensors: int
    per_pass: list[dict]

    def render(self) -> str:
        lines = [f"wrote {self.output}"]
        for p in self.per_pass:
            extra = f", {p['skipped']} skipped" if p.get("skipped") else ""
            # model passes change the model in memory: they have no per-tensor count to report
            what = "model pass" if p["changed"] is None else f"{p['changed']} tensors changed"
            lines.append(f"  passes[{p['index']}] {p['type']}: {what}{extra}")
        gb = 1e9
        lines.append(f"  weights: {self.input_bytes / gb:.3f} GB -> {self.output_bytes / gb:.3f} GB;"
                     f" packed layers {self.linear_bytes_before / gb:.3f} GB -> {self.linear_bytes_after / gb:.3f} GB")
        lines.append(f"  {self.tensors} tensors in {self.seconds:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _build_source_chain(plan: Plan, source: Source, ctx: PassContext) -> Source:
    pending: list[FusedStep] = []

    def flush(src: Source) -> Source:
        nonlocal pending
        if pending:
            src = SweepSource(src, pending, ctx)
            pending = []
        return src

    for pp in plan.passes:
        handler = handler_for(pp.config)
        if pp.config.kind is PassKind.TENSOR:
            pending.append(FusedStep(pp.config, handler, pp.targets, pp.index))
        elif pp.config.kind is PassKind.CHECKPOINT:
            source = handler.apply(pp.config, flush(source), ctx)
        else:
            model = materialize(flush(source), ctx.device)
            packed = handler.apply(pp.config, model, ctx)  # a packing model pass returns {weight: TensorState}
            source = ModelSource(model.to("cpu"), source, packed if pp.config.packs else None)
    return flush(source)


def _tensor_only(plan: Plan) -> bool:
    return all(pp.config.kind is PassKind.TENSOR for pp in plan.passes)


def build_sweep(model: str, recipe_yaml: str, allow_pickle: bool, device: str):
    """Rebuild the source chain in another process (a worker): (source, shapes, nbytes)."""
    from .recipe import parse_recipe

    reader = CheckpointReader(model, allow_pickle=allow_pickle)
    source = CheckpointSource(reader)
    plan = make_plan(parse_recipe(recipe_yaml, "<recipe>"), source)
    final = _build_source_chain(plan, source, PassContext(input_path=reader.path, device=device, progress=False,
                                                          plan=plan))
    return final, final.view.tensors, _nbytes


def run(recipe: Recipe, model: str | Path, output: str | Path, *, overwrite: bool = False,
        shard_bytes: int = DEFAULT_SHARD_BYTES, allow_pickle: bool = False, device: str = "cpu",
        progress: bool = True, plan_only: bool = False, workers: int = 1) -> Summary | Plan | None:
    """Compress `model` with `recipe` into `output`. Everything is validated before the first weight is read.

    `workers` > 1 computes tensors in that many processes (tensor passes only); under torchrun / accelerate
    launch (WORLD_SIZE > 1) the ranks share the tensors and rank 0 writes (other ranks return None); model passes
    with `supports_ranks` (block_sparse) then run on every rank, each on its own GPU (cuda:LOCAL_RANK), and share
    their work. Either way the bytes are those of a single-process run on the same kind of device.
    """
    from . import parallel

    start = time.time()
    check_device(device)
    reader = CheckpointReader(model, allow_pickle=allow_pickle)
    source: Source = CheckpointSource(reader)
    plan = make_plan(recipe, source)
    if plan_only:
        return plan
    rank, world = parallel.dist_world()
    if workers > 1 and not _tensor_only(plan):
        raise PlanError(f"{recipe.source}: --workers needs a recipe of tensor passes only"
                        f" (this one has {', '.join(p.config.type for p in plan.passes if p.config.kind is not PassKind.TENSOR)})")
    unranked = [p.config.type + (" (sequential)" if getattr(p.config, "sequential", False) else "")
                for p in plan.passes
                if p.config.kind is not PassKind.TENSOR and not getattr(p.config, "supports_ranks", False)]
    if world > 1 and unranked:
        raise PlanError(f"{recipe.source}: a multi-rank run (torchrun, accelerate launch) takes tensor passes and"
                        f" model passes that share their work between ranks (block_sparse, except sequential);"
                        f" this recipe has {', '.join(unranked)}: run it in one process")
    if world <= 1:
        return _run(recipe, model, output, plan, source, reader, overwrite, shard_bytes, allow_pickle, device,
                    progress, workers, start)
    owned = parallel.init_distributed(device)
    device = parallel.rank_device(device)  # one GPU per rank
    released = [False]  # rank 0 failed before any work and told the other ranks so
    clean = False  # tear down only where every rank gets there; after an unexpected error the launcher stops them
    try:
        if rank != 0:
            result = _serve_rank(plan, source, reader, device, progress)
        else:
            result = _run(recipe, model, output, plan, source, reader, overwrite, shard_bytes, allow_pickle, device,
                          progress, workers, start, released)
        clean = True
        return result
    finally:
        if owned and (clean or released[0]):
            parallel.finish_distributed()


def _run(recipe: Recipe, model, output, plan: Plan, source: Source, reader: CheckpointReader, overwrite: bool,
         shard_bytes: int, allow_pickle: bool, device: str, progress: bool, workers: int, start: float,
         released: list | None = None) -> Summary:
    """The writing side of `run` (the only process, or rank 0)."""
    from tqdm.auto import tqdm

    from . import parallel

    rank, world = parallel.dist_world()
    key = resume_key(reader, recipe, shard_bytes, device)
    expected = 4 * len(plan.final_view.tensors)  # a packed weight becomes at most 4 tensors
    try:
        writer = CheckpointWriter(Path(output), shard_bytes, overwrite, resume_key=key,  # checks the output first
                                  expected_tensors=expected)
    except Exception:
        if world > 1:  # release the other ranks, which wait for the go before any work
            import torch.distributed as dist

            dist.broadcast_object_list([None], src=0)
            if released is not None:
                released[0] = True
        raise
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list([True], src=0)  # go: the other ranks build the chain (model passes) with us
    ctx = PassContext(input_path=reader.path, device=device, progress=progress, plan=plan, distributed=world > 1)
    with writer:
        if writer.completed:
            log.warning(f"resuming: {len(writer.completed)} tensors already written by an interrupted run")
        final = _build_source_chain(plan, source, ctx)
        names = final.names()
        shapes = final.view.tensors
        todo = [n for n in names if n not in writer.completed]
        if world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list([todo], src=0)
            groups = parallel.ranks(final, shapes, todo, _nbytes, device)
        elif workers > 1:
            groups = parallel.workers(workers, build_sweep, (str(reader.path), recipe.to_yaml(), allow_pickle,
                                                             device), todo)
        else:
            if _tensor_only(plan):  # the sweep reads the input in exactly this order: read ahead of it
                reader.read_ahead(todo)
            groups = parallel.serial(final, shapes, todo, _nbytes)
        total = sum(_nbytes(*shapes[n]) for n in names if n in shapes)
        modules: dict[str, dict] = dict(final.view.packed_modules)
        linear_before = linear_after = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc="compress", disable=None if progress else True,
                  leave=False) as bar:
            for n_done, name in enumerate(names, 1):
                record = writer.completed.get(name)
                if record is None:
                    produced, record, tensors = next(groups)
                    assert produced == name, (produced, name)  # producers keep the order
                    writer.add_group(name, tensors, record)
                    del tensors
                if record:
                    modules[record["module"]] = record["entry"]
                    linear_before += record["bytes_before"]
                    linear_after += record["bytes_after"]
                bar.update(_nbytes(*shapes[name]) if name in shapes else 0)
                bar.set_postfix(tensors=f"{n_done}/{len(names)}", refresh=False)
        reader.stop_read_ahead()
        writer.finish_shards()
        config = dict(final.view.config)
        if modules:
            config["quantization_config"] = {"quant_method": QUANT_METHOD, "version": QUANT_CONFIG_VERSION,
                                             "modules": dict(sorted(modules.items()))}
        writer.write_json("config.json", config)
        for rel, src in final.side_files().items():
            if isinstance(src, Path):
                writer.copy_file(src, rel)
            else:
                writer.write_text(rel, src.decode() if isinstance(src, bytes) else src)
        writer.write_text("recipe.yaml", _recipe_record(recipe))
        per_pass = []
        for pp in plan.passes:
            changed = len(pp.targets) if pp.config.kind is PassKind.TENSOR or pp.targets else None  # read once
            per_pass.append({"index": pp.index, "type": pp.config.type, "kind": pp.config.kind.value,
                             "changed": changed, "skipped": len(pp.skipped), "skipped_modules": pp.skipped})
        summary = Summary(Path(output), 0.0, reader.total_bytes, writer.bytes_written, linear_before, linear_after,
                          len(names), per_pass)
        summary.seconds = round(time.time() - start, 3)
        writer.write_json("bitsmith.json", {
            "bitsmith_version": __version__,
            "base_model": _public_model_name(model, reader.path),
            "input_bytes": summary.input_bytes, "output_bytes": summary.output_bytes,
            "linear_bytes_before": linear_before, "linear_bytes_after": linear_after,
            "passes": [{k: v for k, v in p.items() if k != "skipped_modules"} for p in per_pass],
        })
        _write_card(writer.tmp)
        writer.commit()
    summary.seconds = round(time.time() - start, 3)
    return summary


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _serve_rank(plan: Plan, source: Source, reader: CheckpointReader, device: str, progress: bool) -> None:
    """A rank other than 0: compute this rank's share of the tensors rank 0 asks for, send them, write nothing."""
    import torch.distributed as dist

    from . import parallel

    go = [None]
    dist.broadcast_object_list(go, src=0)
    if go[0] is None:  # rank 0 stopped before any work (its error is reported there)
        return None
    final = _build_source_chain(plan, source, PassContext(input_path=reader.path, device=device, progress=False,
                                                          plan=plan, distributed=True))
    box = [None]
    dist.broadcast_object_list(box, src=0)
    for _ in parallel.ranks(final, final.view.tensors, box[0], _nbytes, device):
        pass
    return None


def check_device(device: str) -> None:
    """A device name torch understands and this machine has; else one clear error before anything is read."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PlanError(f"--device {device!r} is not a device name (use cpu, cuda, cuda:1, ...): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlanError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__};"
                            f" use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PlanError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise PlanError(f"--device {device}: not supported (use cpu or cuda[:N])")


def resume_key(reader: CheckpointReader, recipe: Recipe, shard_bytes: int, device: str = "cpu") -> str:
    """Fingerprint of everything the output bytes depend on: a run with the same key may resume another's shards.

    The device type counts (an accelerator's reductions may round differently from the CPU's), the device index not.
    """
    files = sorted({i.file for i in reader.tensors.values()} | {"config.json"})
    stats = [(f, (reader.path / f).stat().st_size, (reader.path / f).stat().st_mtime_ns) for f in files]
    parts = [__version__, recipe.to_yaml(), str(reader.path.resolve()), stats, shard_bytes]
    referenced = _referenced_file_stats(recipe)
    if referenced:  # files the passes read besides the input (soup ingredients, a donor, calibration text...)
        parts.append(referenced)
    kind = torch.device(device).type
    if kind != "cpu":  # CPU runs keep the key they always had
        parts.append(kind)
    blob = json.dumps(parts)
    return hashlib.sha256(blob.encode()).hexdigest()


def _referenced_file_stats(recipe: Recipe) -> list:
    """(path, size, mtime) of every existing file a pass config names, and of the files directly inside every
    folder it names: an ingredient, donor or text changed between a killed run and its restart changes the key."""
    found: list[str] = []

    def walk(v) -> None:
        if isinstance(v, str) and 0 < len(v) < 4096 and ("/" in v or "." in v):
            found.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    for cfg in recipe.passes:
        walk(cfg.model_dump(mode="json"))
    out = []
    for v in found:
        try:
            p = Path(v).expanduser()
            files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
            out += [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        except OSError:
            continue
    return out


def _recipe_record(recipe: Recipe) -> str:
    head = f"# applied by bitsmith {__version__}"
    if recipe.overrides:
        head += "; overrides: " + " ".join(recipe.overrides)
    return head + "\n" + recipe.to_yaml()


def _public_model_name(model: str | Path, resolved: Path) -> str:
    """A name safe to publish: the Hub id as given, or the folder's basename (never a local path)."""
    s = str(model)
    if not Path(s).expanduser().exists():
        return s
    return resolved.name


def _write_card(folder: Path) -> None:
    try:
        from .card import write_model_card
    except ImportError:
        return
    write_model_card(folder)
