"""Load a checkpoint in the standard GPTQ layout (ours or another tool's) without gptqmodel/optimum.

The model is built on the meta device from its config (no memory, no random init), every Linear
that has a `qweight` in the checkpoint becomes a `QuantLinear` on the target device, the other
tensors are assigned directly, and buffers not stored in checkpoints (rotary frequencies) are
computed by transformers' own initialisation. Peak memory is the packed checkpoint plus the
unquantized tensors, never the full-precision model.

A quantized output head (`lm_head: true`) loads like any other Linear. When the checkpoint says the
source tied its input embeddings to that head (`meta.tied_embeddings`), the full-precision
embeddings in the file (there for other loaders) are dropped after loading and the lookups served
from the head's codes (`QuantEmbedding`): the table is then held once, quantized, as in the source
(docs/formats.md gives the quality this costs; `EMBEDDINGS_FROM_HEAD` turns it off).

A head the checkpoint keeps in full precision (the default, because transformers' GPTQ loader cannot
read a quantized one) is still the largest single read of every decoded token: `head` says how to round
it as it loads (llmopt.quantize.head). The file is unchanged; only llmopt's runtime does this, and
`bench` says so in its method (docs/runtime.md gives its cost in quality and its gain in speed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llmopt.errors import UserError
from llmopt.models import check_loading_info, check_weight_files, reading_weights
from llmopt.quantize import fusion, packing
from llmopt.quantize.head import embeddings_from_head, round_head, runtime_head
from llmopt.quantize.qlinear import QuantLinear

_QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
# serve a tied model's embeddings from its quantized head (False: keep the file's full-precision table)
EMBEDDINGS_FROM_HEAD = True
# run sibling projections (q/k/v, gate/up) as one quantized matmul (llmopt.quantize.fusion)
FUSE_SIBLINGS = True


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


def module_grid(qconfig: dict, name: str, bits: int, group_size: int) -> tuple[int, int]:
    """(bits, group_size) of one module: the first `dynamic` pattern matching its name (GPTQModel's
    convention: a regular expression, `+:` or no prefix overrides, `-:` excludes) may override them."""
    for pattern, override in (qconfig.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(raw, name):
            if negative or not isinstance(override, dict):
                break
            return int(override.get("bits", bits)), int(override.get("group_size", group_size))
    return bits, group_size


def load_gptq_model(path: Path, config: dict, device: torch.device, dtype: torch.dtype, head: str = "auto"):
    """FORMAT_LOADERS entry for quant_method 'gptq'; `head`: see `runtime_head`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qconfig = dict(config["quantization_config"])
    bits = int(qconfig.get("bits", 4))
    if bits not in packing.BITS:
        raise UserError(f"{path}: GPTQ with {bits} bits is not supported", hint="llmopt reads 2, 3, 4 and 8 bits")
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
    groups = fusion.sibling_groups(prefixes) if FUSE_SIBLINGS else []
    grouped = {p for g in groups for p in g}
    for group in groups + [[p] for p in prefixes if p not in grouped]:
        units = [_unit(model, tensors, qconfig, p, fmt, dtype, str(path)) for p in group]
        if len(units) > 1 and fusion.fusable(units):
            for prefix, module in zip(group, fusion.fuse(units, device, QuantLinear)):
                model.set_submodule(prefix, module)
            continue
        for prefix, u in zip(group, units):
            model.set_submodule(prefix, QuantLinear(*u, device))

    _assign_rest(model, tensors, dtype, str(path))
    model.to(device)
    model.config.quantization_config = qconfig
    if EMBEDDINGS_FROM_HEAD and qconfig.get("lm_head") and (qconfig.get("meta") or {}).get("tied_embeddings"):
        embeddings_from_head(model)
    served = runtime_head(head, device)
    rounded = round_head(model, served) if served != "full" else None
    if rounded:
        model.runtime_head = rounded      # read by bench's report: not the checkpoint's own precision
    return model


def _unit(model: torch.nn.Module, tensors: dict[str, torch.Tensor], qconfig: dict, prefix: str, fmt: str,
          dtype: torch.dtype, label: str) -> fusion.Unit:
    """One quantized Linear's codes, taken out of `tensors`: (q, zeros, scales, g_idx, bias, bits, group)."""
    try:
        linear = model.get_submodule(prefix)
    except AttributeError as e:
        raise UserError(f"{label}: quantized module {prefix} does not exist in this architecture") from e
    parts = {k: tensors.pop(f"{prefix}.{k}") for k in _QUANT_KEYS if f"{prefix}.{k}" in tensors}
    bias = tensors.pop(f"{prefix}.bias", None)
    b, g = module_grid(qconfig, prefix, int(qconfig.get("bits", 4)), int(qconfig.get("group_size", -1)))
    if b not in packing.BITS:
        raise UserError(f"{label}: GPTQ with {b} bits ({prefix}) is not supported",
                        hint="llmopt reads 2, 3, 4 and 8 bits")
    q, zeros, scales, g_idx = packing.unpack_layer(parts, b, fmt, linear.in_features, linear.out_features, g)
    return q, zeros, scales, g_idx, None if bias is None else bias.to(dtype), b, g


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
