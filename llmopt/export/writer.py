"""`llmopt export MODEL -o OUT.gguf`: write a local checkpoint as one GGUF file for llama.cpp.

Metadata (architecture, tokenizer, chat template), then tensor by tensor: GPTQ layers through the block
mapping (`blocks.py`), every other tensor converted to the type llama.cpp would give it (`filetype.py`).
The file is written to a temporary sibling and renamed at the end; its `llmopt.export` key records how it
was made, which is also how --force recognises an earlier llmopt output.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGML_QUANT_VERSION

from llmopt.checkpoint import atomic_file, check_output_file, versions
from llmopt.errors import UserError
from llmopt.export.arch import TensorNames, add_hparams, arch_for, rope_freqs
from llmopt.export.blocks import Mapped, convert, map_gptq
from llmopt.export.filetype import FILE_TYPES, file_type, tensor_type
from llmopt.export.options import ExportOptions
from llmopt.export.source import Checkpoint
from llmopt.export.vocab import add_vocab
from llmopt.models import check_causal, local_dir, read_config
from llmopt.progress import SILENT, Progress

PROVENANCE_KEY = "llmopt.export"


def is_llmopt_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file llmopt wrote (the only kind of file --force replaces)."""
    try:
        return PROVENANCE_KEY in GGUFReader(path).fields
    except Exception:  # noqa: BLE001 - not a GGUF file, or a damaged one: not ours to replace
        return False


def _checkpoint(spec: str, progress: Progress) -> Checkpoint:
    source = local_dir(spec, progress)
    if source.kind == "gguf":
        raise UserError(f"{spec} is a GGUF file already", hint="pass the model directory it came from")
    if source.kind == "hub":
        raise UserError("llmopt export reads local models", hint="download the model first or pass an alias")
    config = read_config(source.path)
    check_causal(config, spec)
    return Checkpoint(source.path, config)


def export(opts: ExportOptions, progress: Progress = SILENT) -> dict:
    """Write opts.model as a GGUF file at opts.output; return the summary (types, sizes, mapping errors)."""
    started = time.time()
    opts.validate()
    check_output_file(opts.output, opts.force, is_llmopt_gguf)
    ckpt = _checkpoint(opts.model, progress)
    arch = arch_for(ckpt.config)
    ftype = file_type(opts.type, ckpt)
    names = TensorNames(arch, ckpt.config)
    plan = [(n, kind, names.gguf_name(n if kind == "tensor" else f"{n}.weight")) for n, kind in ckpt.modules()]
    plan = [p for p in plan if p[2] is not None]
    tied = "output.weight" not in {g for _, _, g in plan}
    embedding = _embedding(plan)
    report: dict = {"types": {}, "layers": [], "notes": [], "reasons": {}}
    with atomic_file(opts.output, opts.force, is_llmopt_gguf) as tmp:
        writer = GGUFWriter(tmp, arch.name)
        n_vocab = int(ckpt.tensor(embedding).shape[0])
        _metadata(writer, opts, ckpt, ftype, n_vocab, report)
        progress.start(f"Writing {Path(opts.output).name} ({ftype})", total=len(plan))
        for name, kind, gguf_name in plan:
            mapped = _tensor(ckpt, names, name, kind, gguf_name, ftype, tied, report)
            writer.add_tensor(gguf_name, mapped.data, raw_dtype=mapped.qtype)
            _count(report, mapped)
            progress.advance(tensor=gguf_name)
        if (factors := rope_freqs(ckpt.config)) is not None:
            writer.add_tensor("rope_freqs.weight", factors)
        progress.finish()
        report["notes"] += [_note(why, tensors) for why, tensors in report.pop("reasons").items()]
        for note in report["notes"]:
            progress.note(note)
        writer.add_string(PROVENANCE_KEY, json.dumps(_provenance(opts, ftype, report, started)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return _summary(opts, ftype, report, started)


def _note(why: str, tensors: list[str]) -> str:
    shown = ", ".join(tensors[:2]) + (", ..." if len(tensors) > 2 else "")
    return f"{len(tensors)} tensor{'s' if len(tensors) > 1 else ''} ({shown}): {why}"


def _embedding(plan: list[tuple[str, str, str]]) -> str:
    name = next((n for n, _, g in plan if g == "token_embd.weight"), None)
    if name is None:
        raise UserError("the checkpoint has no token embedding", hint="export a complete causal LM checkpoint")
    return name


def _metadata(writer: GGUFWriter, opts: ExportOptions, ckpt: Checkpoint, ftype: str, n_vocab: int,
              report: dict) -> None:
    writer.add_name(str(ckpt.config.get("_name_or_path") or ckpt.config.get("_model_name_or_path")
                        or Path(opts.model).name))
    writer.add_file_type(int(FILE_TYPES[ftype]))
    if ftype.startswith("q"):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    add_hparams(writer, arch_for(ckpt.config), ckpt.config)
    writer.add_vocab_size(n_vocab)
    report["tokenizer"] = add_vocab(writer, ckpt.path, n_vocab)
    if dropped := report["tokenizer"]["dropped"]:
        report["notes"].append(f"added tokens beyond the {n_vocab} embedding rows left out: {', '.join(dropped)}")


def _tensor(ckpt: Checkpoint, names: TensorNames, name: str, kind: str, gguf_name: str, ftype: str, tied: bool,
            report: dict) -> Mapped:
    """One tensor in its GGML type: a GPTQ layer through the block mapping, anything else converted;
    then llama.cpp's row order for q/k and Gemma's norm offset."""
    if kind == "gptq":
        layer = ckpt.gptq_layer(name)
        qtype, note = tensor_type(gguf_name, tuple(layer.q.shape), ftype, tied)
        mapped = map_gptq(layer, qtype)
        report["layers"].append({"tensor": gguf_name, "type": qtype.name, "gptq_bits": layer.bits,
                                 "group_size": layer.group_size, "sym": layer.sym, "mapping": mapped.how,
                                 "max_abs_error": mapped.max_abs_error, "rel_error": mapped.rel_error})
    else:
        weight = ckpt.tensor(name).float()
        qtype, note = tensor_type(gguf_name, tuple(weight.shape), ftype, tied)
        mapped = convert((weight + names.shift(gguf_name)).numpy(), qtype)
    if note:
        report["reasons"].setdefault(note, []).append(gguf_name)
    order = names.row_order(gguf_name)
    if order is not None:
        mapped.data = np.ascontiguousarray(mapped.data[order.numpy()])
    return mapped


def _count(report: dict, mapped: Mapped) -> None:
    entry = report["types"].setdefault(mapped.qtype.name, {"tensors": 0, "bytes": 0})
    entry["tensors"] += 1
    entry["bytes"] += int(mapped.data.nbytes)


def _mapping_summary(layers: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer["mapping"]] = counts.get(layer["mapping"], 0) + 1
    worst = max((r for r in layers if r["rel_error"] > 0), key=lambda r: r["rel_error"], default=None)
    return {"gptq_layers": len(layers), "mappings": counts,
            "max_abs_error": max((r["max_abs_error"] for r in layers), default=None),
            "max_rel_error": worst["rel_error"] if worst else (0.0 if layers else None),
            "worst_layer": worst["tensor"] if worst else None}


def _provenance(opts: ExportOptions, ftype: str, report: dict, started: float) -> dict:
    return {"llmopt_format": 1, "command": "export", "source_model": opts.model, "type": ftype,
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_time_s": round(time.time() - started, 3), **_mapping_summary(report["layers"])}


def _summary(opts: ExportOptions, ftype: str, report: dict, started: float) -> dict:
    out = Path(opts.output)
    return {"output": str(out), "source_model": opts.model, "type": ftype, "file_bytes": out.stat().st_size,
            "tensor_types": report["types"], "tokenizer": report["tokenizer"], **_mapping_summary(report["layers"]),
            "notes": report["notes"], "layers": report["layers"], "wall_time_s": round(time.time() - started, 2)}
