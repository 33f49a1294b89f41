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
read a quantized one) is still the largest single read of every decoded token: with `head="int8"`
(what `"auto"` means on CPU) it is rounded to 8 bits, one scale per output row, as it loads, and a
tied embedding is served from those codes. The file is unchanged; only llmopt's runtime does this,
and `bench` says so in its method (docs/runtime.md gives its cost in quality and its gain in speed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llmopt.errors import UserError
from llmopt.models import check_head, check_loading_info, check_weight_files, reading_weights
from llmopt.quantize import fusion, packing
from llmopt.quantize.qlinear import QuantLinear

_QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
# serve a tied model's embeddings from its quantized head (False: keep the file's full-precision table)
EMBEDDINGS_FROM_HEAD = True
# run sibling projections (q/k/v, gate/up) as one quantized matmul (llmopt.quantize.fusion)
FUSE_SIBLINGS = True


def head_rows(head: QuantLinear, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of the head's dequantized weight W [N, K] in the checkpoint's column order, as
    `[*ids.shape, K]` in `dtype`: `head.dequantized_weight(torch.float32)` rounded once to `dtype`,
    dequantizing only those rows (except on the CUDA int4 path, whose buffer layout is opaque: there the
    whole weight is)."""
    out_dtype, dtype = dtype, torch.float32
    flat = ids.reshape(-1).long()
    if head.mode == "int4" and getattr(head, "cheap_dequant", False):
        codes = head.int4_codes_of_rows(flat)                                  # [M, Kp]
        sz = head.scales_zeros[:, flat].float()                                # [Kp/kg, M, 2]
        scale, offset = sz[..., 0].t(), (sz[..., 1] - 8 * sz[..., 0]).t()       # [M, Kp/kg]
        q = codes.to(dtype).view(len(flat), -1, head.kernel_group)
        w = torch.addcmul(offset.to(dtype).unsqueeze(2), q, scale.to(dtype).unsqueeze(2))
        w = w.reshape(len(flat), head.k_pad)[:, : head.in_features]
        if head.perm is not None:     # kernel columns are sorted by group: back to the checkpoint's order
            w = torch.empty_like(w).index_copy_(1, head.perm, w)
    elif head.mode == "int8":
        w = head.w_int8[flat].to(dtype) * head.scales_bf16[flat].to(dtype).unsqueeze(1)
        if head.zero_shift is not None:
            w = w - head.zero_shift[flat].to(dtype).unsqueeze(1)
    elif head.mode == "dequant":
        codes = packing.unpack_rows(head.qweight[:, flat], head.bits, head.in_features).t()
        w = packing.dequantize(codes, head.zeros[:, flat], head.scales[:, flat], head.g_idx.long(), dtype)
    else:
        w = head.dequantized_weight(dtype)[flat]
    return w.to(out_dtype).reshape(*ids.shape, head.in_features)


class QuantEmbedding(torch.nn.Module):
    """Input embeddings read from a quantized output head that the source tied to them: a lookup
    dequantizes only the rows it needs. `embed_scale` keeps a scaled embedding's factor (Gemma3
    multiplies by sqrt(hidden), cast to the model's dtype). The head is referenced, not registered, so
    its codes are held and counted once; `weight` is a storage-free stand-in (shape, dtype, device),
    also set on the head, so code that checks for a tied head sees one."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.__dict__["head"] = head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx, self.dtype = padding_idx, dtype
        device = next(head.buffers()).device
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.to(device),
                             persistent=False)
        self.weight = torch.empty((), dtype=dtype, device=device).expand(self.num_embeddings, self.embedding_dim)
        head.weight = self.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = head_rows(self.head, input_ids, self.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, from the quantized head"


def embeddings_from_head(model: torch.nn.Module) -> None:
    """Replace the input embeddings by a `QuantEmbedding` reading the quantized head, freeing the table."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(head, QuantLinear) or not isinstance(emb, torch.nn.Embedding):
        return
    if emb.weight.shape != (head.out_features, head.in_features):
        return
    scale = getattr(emb, "embed_scale", None)
    model.set_input_embeddings(QuantEmbedding(head, emb.weight.dtype, emb.padding_idx,
                                              scale if isinstance(scale, torch.Tensor) else None))


def runtime_head(head: str, device: torch.device) -> str:
    """What `--head` means on this device: `auto` is int8 on CPU, where PyTorch has the int8 kernel;
    int8 and int4 are served by the kernels where they exist, by dequantizing elsewhere."""
    check_head(head)
    if head == "auto":
        return "int8" if device.type == "cpu" else "full"
    return head


HEAD_INT4_GROUP = 32      # columns per scale/zero pair of `--head int4` (llama.cpp's Q4_1 block)


def round_head(model: torch.nn.Module, served: str) -> str | None:
    """Round a full-precision output head as it loads, and serve a tied embedding from its codes:
    `int8`: 8-bit codes, one symmetric scale per output row (`_weight_int8pack_mm`); `int4`: 4-bit
    codes, a scale and zero point per `HEAD_INT4_GROUP` columns, round-to-nearest (the int4 kernel), or
    int8 when the head's width is not a whole number of those groups. Returns what it did: "int8",
    "int4", or None when there is nothing to do (no plain Linear head)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.is_meta:
        return None
    w = head.weight.detach()
    group = HEAD_INT4_GROUP if served == "int4" and w.shape[1] % HEAD_INT4_GROUP == 0 else -1
    bits = 4 if group > 0 else 8
    q = torch.empty(w.shape, dtype=torch.uint8)
    scales = torch.empty(max(1, w.shape[1] // group), w.shape[0])
    zeros = torch.empty(scales.shape, dtype=torch.int16)
    for r0 in range(0, w.shape[0], 4096):      # in row chunks: no float32 copy of the whole table
        rows = w[r0:r0 + 4096].float()         # a copy: the tied table is still in use
        q[r0:r0 + 4096], scales[:, r0:r0 + 4096], zeros[:, r0:r0 + 4096] = _round_rows(rows, bits, group)
    g_idx = torch.arange(w.shape[1]) // group if group > 0 else torch.zeros(w.shape[1], dtype=torch.int32)
    bias = None if head.bias is None else head.bias.detach()
    module = QuantLinear(q, zeros, scales, g_idx, bias, bits, group, w.device)
    tied = model.get_input_embeddings().weight is head.weight
    model.set_submodule(next(n for n, m in model.named_modules() if m is head), module)
    if tied:
        embeddings_from_head(model)
    return f"int{bits}"


def _round_rows(rows: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [R, K] uint8, scales [G, R], true zeros [G, R]): 8 bits symmetric per row (zero 128), or
    `bits` asymmetric per group of columns (min to max over 2^bits - 1 steps)."""
    tiny = torch.finfo(torch.float32).tiny
    if group <= 0:
        scale = (rows.abs().amax(dim=1) / 127).clamp(min=tiny)
        q = (rows / scale[:, None]).round_().clamp_(-127, 127) + 128
        return q.to(torch.uint8), scale[None, :], torch.full((1, rows.shape[0]), 128, dtype=torch.int16)
    g = rows.view(rows.shape[0], -1, group)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=tiny)                  # [R, G]
    zero = (-lo / scale).round_().clamp_(0, 2 ** bits - 1)
    q = (g / scale[..., None]).round_().add_(zero[..., None]).clamp_(0, 2 ** bits - 1)
    return q.view_as(rows).to(torch.uint8), scale.t().contiguous(), zero.t().to(torch.int16).contiguous()


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
