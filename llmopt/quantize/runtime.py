"""Load a checkpoint in the standard GPTQ layout (ours or another tool's) without gptqmodel/optimum.

The model is built on the meta device from its config (no memory, no random init), every Linear
that has a `qweight` in the checkpoint becomes a `QuantLinear` on the target device, the other
tensors are assigned directly, and buffers not stored in checkpoints (rotary frequencies) are
computed by transformers' own initialisation. Peak memory is the packed checkpoint plus the
unquantized tensors, never the full-precision model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llmopt.errors import UserError
from llmopt.models import check_loading_info, check_weight_files, reading_weights
from llmopt.quantize import packing
from llmopt.quantize.qlinear import QuantLinear

_QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors, sharded or not; .bin as a fallback)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    check_weight_files(path, str(path))
    with reading_weights(str(path), path):
        for f in files:
            tensors.update(load_file(path / f))
        for f in [] if files else sorted(path.glob("*.bin")):
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    return tensors


def checkpoint_format(qconfig: dict) -> str:
    fmt = qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq"
    if fmt not in packing.FORMATS:
        raise UserError(f"GPTQ checkpoint format '{fmt}' is not supported by llmopt's runtime",
                        hint="llmopt reads the gptq and gptq_v2 formats")
    return fmt


def load_gptq_model(path: Path, config: dict, device: torch.device, dtype: torch.dtype):
    """FORMAT_LOADERS entry for quant_method 'gptq'."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qconfig = dict(config["quantization_config"])
    bits = int(qconfig.get("bits", 4))
    if bits not in packing.BITS:
        raise UserError(f"{path}: GPTQ with {bits} bits is not supported", hint="llmopt reads 2, 3, 4 and 8 bits")
    group_size = int(qconfig.get("group_size", -1))
    fmt = checkpoint_format(qconfig)

    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)

    tensors = read_tensors(path)
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise UserError(f"{path}: config says GPTQ but the weights hold no qweight tensors")
    for prefix in prefixes:
        try:
            linear = model.get_submodule(prefix)
        except AttributeError as e:
            raise UserError(f"{path}: quantized module {prefix} does not exist in this architecture") from e
        parts = {k: tensors.pop(f"{prefix}.{k}") for k in _QUANT_KEYS if f"{prefix}.{k}" in tensors}
        bias = tensors.pop(f"{prefix}.bias", None)
        q, zeros, scales, g_idx = packing.unpack_layer(parts, bits, fmt, linear.in_features, linear.out_features,
                                                       group_size)
        module = QuantLinear(q, zeros, scales, g_idx, None if bias is None else bias.to(dtype), bits, group_size,
                             device)
        model.set_submodule(prefix, module)

    _assign_rest(model, tensors, dtype, str(path))
    model.to(device)
    model.config.quantization_config = qconfig
    return model


def _assign_rest(model: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, label: str) -> None:
    """Assign the unquantized tensors; refuse missing, unexpected or mis-shaped ones, as models.py does for
    full-precision checkpoints (transformers' own ignore list and stale rotary buffers are not unexpected)."""
    wanted = model.state_dict()
    fits = {k: v for k, v in tensors.items() if k in wanted and v.shape == wanted[k].shape}
    mismatched = [(k, v.shape, wanted[k].shape) for k, v in tensors.items() if k in wanted and k not in fits]
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in fits.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _materialize_buffers(model)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
               if p.is_meta and n not in tensors]
    ignored = re.compile("|".join([r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$",
                                   *(model._keys_to_ignore_on_load_unexpected or [])]))
    unexpected = [k for k in tensors if k not in wanted and not ignored.search(k)]
    check_loading_info({"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched},
                       label)


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Compute the non-persistent buffers (e.g. rotary inv_freq) left on the meta device."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        for n in meta:
            buf = getattr(module, n)
            persistent = n not in module._non_persistent_buffers_set
            module.register_buffer(n, torch.empty_like(buf, device="cpu"), persistent=persistent)
        # transformers' init functions skip tensors flagged as initialised: keep the loaded weights
        saved = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
        for p in module.parameters(recurse=False):
            p._is_hf_initialized = True
        model._init_weights(module)
        for n, p in module.named_parameters(recurse=False):
            if not torch.equal(p.detach(), saved[n]):
                p.data.copy_(saved[n])
