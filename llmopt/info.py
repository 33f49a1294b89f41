"""What a model is: architecture, shapes, parameter counts and bytes, for `info`, `bench` and reports.

Sizes are given against two references, because "0.32x the size" means little without saying of
what: float32 (4 bytes a parameter) and the original's own dtype, the dtype its source checkpoint
stores (bfloat16 for most hub models, so a float32 copy in memory is 2x the original).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmopt.checkpoint import dir_size, read_provenance

# safetensors header dtype -> (torch name, bytes); only floating-point tensors say what a checkpoint stores
_FLOAT_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
                 "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
DTYPE_BYTES = {name: size for name, size in _FLOAT_DTYPES.values()}


def _logical_numel(module: torch.nn.Module) -> int | None:
    """Parameters a compressed module stands for (packed storage hides them)."""
    n = getattr(module, "n_logical_params", None)
    if n is not None:
        return int(n() if callable(n) else n)
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)   # bitsandbytes 4-bit packs two values per byte
    if state is not None and getattr(state, "shape", None) is not None:
        bias = getattr(module, "bias", None)
        return int(torch.Size(state.shape).numel()) + (bias.numel() if bias is not None else 0)
    return None


def count_parameters(model: torch.nn.Module) -> int:
    """Logical parameter count; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    total = 0

    def visit(module: torch.nn.Module) -> None:
        nonlocal total
        logical = _logical_numel(module)
        if logical is not None:
            total += logical
            return
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        for child in module.children():
            visit(child)

    visit(model)
    return total


def embedding_parameters(model: torch.nn.Module) -> int:
    """Input embeddings plus an untied output head: the part width pruning and GPTQ leave alone."""
    emb = model.get_input_embeddings()
    n = emb.weight.numel()
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight is not emb.weight:
        n += _logical_numel(head) or head.weight.numel()
    return n


def _quant_scales(module: torch.nn.Module) -> list[torch.Tensor]:
    """Scales bitsandbytes keeps beside its packed weights, outside parameters and buffers."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    found = []
    if state is not None:
        found += [state.absmax, state.code]
        if getattr(state, "nested", False) and getattr(state, "state2", None) is not None:
            found += [state.state2.absmax, state.state2.code]
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    found.append(scb)
    return [t for t in found if isinstance(t, torch.Tensor)]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights held in memory (parameters, persistent buffers and quantization scales; tied
    tensors once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + _quant_scales(module)
        persistent = getattr(module, "_non_persistent_buffers_set", set())
        tensors += [b for name, b in module.named_buffers(recurse=False) if name not in persistent]
        for t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def quantization(model: torch.nn.Module) -> dict | None:
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        return None
    q = dict(q if isinstance(q, dict) else q.to_dict())
    method = q.get("quant_method")
    if method is not None:
        q["quant_method"] = getattr(method, "value", method)   # an Enum in transformers' config objects
    return q


def model_info(model: torch.nn.Module, path: Path | None = None) -> dict[str, Any]:
    """A flat description used by `llmopt info` and in every report."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    params = count_parameters(model)
    emb = embedding_parameters(model)
    heads = getattr(text_cfg, "num_attention_heads", None)
    q = quantization(model)
    info = {
        "architecture": (cfg.architectures or [type(model).__name__])[0] if getattr(cfg, "architectures", None)
        else type(model).__name__,
        "model_type": cfg.model_type,
        "layers": getattr(text_cfg, "num_hidden_layers", None),
        "hidden_size": getattr(text_cfg, "hidden_size", None),
        "attention_heads": heads,
        "kv_heads": getattr(text_cfg, "num_key_value_heads", heads),
        "head_dim": getattr(text_cfg, "head_dim", None) or (
            text_cfg.hidden_size // heads if heads else None),
        "intermediate_size": getattr(text_cfg, "intermediate_size", None),
        "vocab_size": getattr(text_cfg, "vocab_size", None),
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "parameters": params,
        "embedding_parameters": emb,
        "non_embedding_parameters": params - emb,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "quantization": q,
        "weight_bytes": weight_bytes(model),
        "disk_bytes": dir_size(path) if path is not None else None,
        "stored_dtype": stored_dtype(path),
    }
    info["bits_per_weight"] = round(8 * info["weight_bytes"] / params, 3) if params else None
    info.update(size_ratios(info["weight_bytes"], params, original_dtype(path)))
    return info


# --------------------------------------------------------------------------- stored and original dtypes

def stored_dtype(path: str | Path | None) -> str | None:
    """The floating-point dtype holding most bytes in a checkpoint directory's .safetensors headers (None
    when there are none: a .gguf file, a hub id, .bin weights)."""
    p = Path(path) if path is not None else None
    if p is None or not p.is_dir():
        return None
    found: dict[str, int] = {}
    for f in sorted(p.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (OSError, ValueError):
            return None
        for name, t in header.items():
            if name != "__metadata__" and t.get("dtype") in _FLOAT_DTYPES:
                dtype = _FLOAT_DTYPES[t["dtype"]][0]
                found[dtype] = found.get(dtype, 0) + t["data_offsets"][1] - t["data_offsets"][0]
    return max(found, key=found.get) if found else None


def _source_original(spec: str, depth: int) -> str | None:
    """The original dtype of an llmopt output's source model, when known without loading it: an alias
    says its own, a local directory is read (following its llmopt.json)."""
    from llmopt.errors import UserError
    from llmopt.models import resolve

    try:
        source = resolve(spec)
    except UserError:
        return None
    if source.kind == "alias":
        return getattr(source.alias, "dtype", None)
    return original_dtype(source.path, depth - 1) if source.kind == "dir" else None


def original_dtype(path: str | Path | None, depth: int = 4) -> str | None:
    """The dtype the original checkpoint stores: for an llmopt output (its llmopt.json names a source)
    that of its source, followed back; else the directory's own stored dtype."""
    if path is None or not Path(path).is_dir():
        return None
    record = read_provenance(path) if depth > 0 else None
    source = record.get("source_model") if isinstance(record, dict) else None
    return _source_original(str(source), depth) if source else stored_dtype(path)


def size_ratios(weight_bytes: int, parameters: int, original: str | None) -> dict[str, Any]:
    """`weight_bytes` against `parameters` held in float32 and in the original's dtype."""
    return {
        "original_dtype": original,
        "size_vs_float32_x": weight_bytes / (4 * parameters) if parameters else None,
        "size_vs_original_dtype_x": weight_bytes / (DTYPE_BYTES[original] * parameters)
        if parameters and original in DTYPE_BYTES else None,
    }
