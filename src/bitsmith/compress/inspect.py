"""`bitsmith inspect`: what a (compressed or original) checkpoint holds, module by module, read from headers only."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointReader
from .formats import check_module_entry, format_params, get_format


def inspect_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    reader = CheckpointReader(path, allow_pickle=allow_pickle)
    qc = reader.config.get("quantization_config") or {}
    packed = qc.get("modules", {}) if qc.get("quant_method") == "bitsmith" else {}
    rows = []
    packed_tensor_names: set[str] = set()
    for module, entry in sorted(packed.items()):
        entry = check_module_entry(module, entry)
        params = format_params(entry)
        names = [n for n in reader.tensors if n.startswith(module + ".")]
        packed_tensor_names.update(names)
        nbytes = sum(reader.tensors[n].nbytes for n in names)
        rows.append({
            "module": module, "format": entry["format"], "bits": params.get("bits"),
            "group_size": params.get("group_size"), "sparsity": get_format(entry["format"]).sparsity(params),
            "shape": [params["out_features"], params["in_features"]], "bytes": nbytes,
            "bits_per_weight": round(8 * nbytes / (params["out_features"] * params["in_features"]), 3),
        })
    for name, info in sorted(reader.tensors.items()):
        if name in packed_tensor_names or not name.endswith(".weight") or len(info.shape) != 2:
            continue
        bits = info.nbytes * 8 // max(1, info.shape[0] * info.shape[1])
        rows.append({"module": name[: -len(".weight")], "format": f"dense-{str(info.dtype).replace('torch.', '')}",
                     "bits": bits, "group_size": None, "sparsity": 0.0, "shape": list(info.shape),
                     "bytes": info.nbytes, "bits_per_weight": float(bits)})
    rows.sort(key=lambda r: r["module"])
    total = reader.total_bytes
    return {
        "path": str(reader.path), "architecture": (reader.config.get("architectures") or ["?"])[0],
        "quant_method": qc.get("quant_method"), "total_bytes": total, "tensors": len(reader.tensors),
        "packed_modules": len(packed), "modules": rows,
        "formats": {name: get_format(name).version for name in sorted(packed_formats(rows))},
    }


def packed_formats(rows: list[dict]) -> set[str]:
    return {r["format"] for r in rows if not r["format"].startswith("dense-")}


def render_table(info: dict) -> str:
    lines = [f"{info['path']}: {info['architecture']}, {info['tensors']} tensors, {info['total_bytes'] / 1e6:.1f} MB,"
             f" {info['packed_modules']} packed modules"]
    header = f"{'module':<48} {'format':<14} {'bits':>4} {'group':>6} {'sparsity':>8} {'shape':>14} {'MB':>9} {'b/w':>6}"
    lines += [header, "-" * len(header)]
    for r in info["modules"]:
        shape = "x".join(str(d) for d in r["shape"])
        group = "" if r["group_size"] is None else str(r["group_size"])
        lines.append(f"{r['module']:<48} {r['format']:<14} {r['bits'] or '':>4} {group:>6} {r['sparsity']:>8.2%}"
                     f" {shape:>14} {r['bytes'] / 1e6:>9.3f} {r['bits_per_weight']:>6.2f}")
    return "\n".join(lines)
