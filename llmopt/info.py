"""What a model is: architecture, shapes, parameter counts and bytes, for `info`, `bench` and reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmopt.checkpoint import dir_size


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
    }
    info["bits_per_weight"] = round(8 * info["weight_bytes"] / params, 3) if params else None
    return info
