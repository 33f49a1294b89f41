"""How llmopt's runtime serves a quantized checkpoint's output head, and embeddings tied to it.

A GPTQ checkpoint keeps its head in full precision by default (transformers' GPTQ loader cannot read a
quantized one), yet the head is the largest single read of every decoded token: 113 MB of SmolLM2's
float32 step, 671 MB of Gemma3-270M's. So `generate` and `bench` round it as it loads (`--head`); the
file is unchanged.

- `int8`: 8-bit codes, one symmetric scale per output row (`_weight_int8pack_mm`).
- `int4`: 4-bit codes, a scale and zero point per `HEAD_INT4_GROUP` columns, round-to-nearest.
- `mixed` (what `auto` means on CPU): int8 for the rows the model itself finds likely, int4 for the rest.
  Most of a large vocabulary is almost never predicted, and a coarse row that stays improbable changes
  no distribution. Which rows: the model as stored samples `HEAD_SAMPLE_TOKENS` tokens from its BOS (fixed
  seed); the rows that hold `HEAD_INT8_MASS` of the probability it gave over those steps are int8. So no
  data is needed, any checkpoint can be served, and the share adapts to the model: about a quarter of
  Gemma3-270M's 262k rows, over half of SmolLM2's 49k (docs/runtime.md has what it costs and saves).

A tied embedding then reads its rows from the head's codes (`QuantEmbedding`): the table is held once.
"""

from __future__ import annotations

import torch

from llmopt.kv_cache import cache_kwargs
from llmopt.models import check_head
from llmopt.quantize import packing
from llmopt.quantize.qlinear import QuantLinear

HEAD_INT4_GROUP = 32      # columns per scale/zero pair of int4 head rows (llama.cpp's Q4_1 block)
HEAD_INT8_MASS = 0.999    # a mixed head keeps in int8 the likeliest rows that hold this share of the sampled mass
HEAD_SAMPLE_TOKENS = 64   # tokens the model samples to find them
_ROW_CHUNK = 4096         # rows rounded at a time: no float32 copy of the whole table


def runtime_head(head: str, device: torch.device) -> str:
    """What `--head` means on this device: `auto` is `mixed` on CPU, where PyTorch has the int8 and int4
    kernels, and `full` elsewhere; the others are served by those kernels or by dequantizing."""
    check_head(head)
    if head == "auto":
        return "mixed" if device.type == "cpu" else "full"
    return head


class MixedHead(torch.nn.Module):
    """An output head in two parts: `wide` (int8) holds the vocabulary rows `wide_rows`, `narrow` (int4)
    the others; each output row is computed by its part alone and put back at its vocabulary index."""

    def __init__(self, wide: QuantLinear, narrow: QuantLinear, wide_rows: torch.Tensor,
                 narrow_rows: torch.Tensor) -> None:
        super().__init__()
        self.wide, self.narrow = wide, narrow
        self.in_features = wide.in_features
        self.out_features = wide.out_features + narrow.out_features
        device = next(wide.buffers()).device
        order = torch.cat([wide_rows, narrow_rows]).long()                     # vocabulary id of each part row
        slot = torch.empty(self.out_features, dtype=torch.int32).index_copy_(
            0, order, torch.arange(self.out_features, dtype=torch.int32))      # part row of each vocabulary id
        self.register_buffer("wide_ids", order[:wide.out_features].to(device), persistent=False)
        self.register_buffer("narrow_ids", order[wide.out_features:].to(device), persistent=False)
        self.register_buffer("slot", slot.to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.wide(x), self.narrow(x)
        out = a.new_empty(*a.shape[:-1], self.out_features)
        return out.index_copy_(-1, self.wide_ids, a).index_copy_(-1, self.narrow_ids, b)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}: {self.wide.out_features} rows int8, the rest int4"


def head_rows(head: QuantLinear | MixedHead, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of the head's dequantized weight W [N, K] in the checkpoint's column order, as
    `[*ids.shape, K]` in `dtype`: `head.dequantized_weight(torch.float32)` rounded once to `dtype`,
    dequantizing only those rows (on CUDA read through tinygemm's learned tile order; where that layout
    could not be read, the whole weight is)."""
    if isinstance(head, MixedHead):
        return _mixed_rows(head, ids, dtype)
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


def _mixed_rows(head: MixedHead, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    slot = head.slot[ids.reshape(-1)].long()
    in_wide = slot < head.wide.out_features
    out = torch.empty(slot.numel(), head.in_features, dtype=dtype, device=slot.device)
    if in_wide.any():
        out[in_wide] = head_rows(head.wide, slot[in_wide], dtype)
    if not in_wide.all():
        out[~in_wide] = head_rows(head.narrow, slot[~in_wide] - head.wide.out_features, dtype)
    return out.reshape(*ids.shape, head.in_features)


class QuantEmbedding(torch.nn.Module):
    """Input embeddings read from a quantized output head that the source tied to them: a lookup
    dequantizes only the rows it needs. `embed_scale` keeps a scaled embedding's factor (Gemma3
    multiplies by sqrt(hidden), cast to the model's dtype). The head is referenced, not registered, so
    its codes are held and counted once; `weight` is a storage-free stand-in (shape, dtype, device),
    also set on the head, so code that checks for a tied head sees one."""

    def __init__(self, head: QuantLinear | MixedHead, dtype: torch.dtype, padding_idx: int | None = None,
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
    if not isinstance(head, (QuantLinear, MixedHead)) or not isinstance(emb, torch.nn.Embedding):
        return
    if emb.weight.shape != (head.out_features, head.in_features):
        return
    scale = getattr(emb, "embed_scale", None)
    model.set_input_embeddings(QuantEmbedding(head, emb.weight.dtype, emb.padding_idx,
                                              scale if isinstance(scale, torch.Tensor) else None))


def round_head(model: torch.nn.Module, served: str) -> str | None:
    """Round a full-precision output head as it loads (`int8`, `int4` or `mixed`, see the module
    docstring) and serve a tied embedding from its codes. The head is int8 instead when int4 rows do not
    fit its width (whole `HEAD_INT4_GROUP`s) or a mixed head's likely rows are all of them. Returns what
    it did, or None when there is nothing to do (no plain Linear head)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.is_meta:
        return None
    w = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    fits = w.shape[1] % HEAD_INT4_GROUP == 0
    wide_rows = None
    if served == "mixed" and fits:
        wide_rows = likely_rows(token_mass(model, HEAD_SAMPLE_TOKENS), HEAD_INT8_MASS)
    if served == "int4" and fits:
        module = _rounded(w, bias, 4)
    elif wide_rows is not None and len(wide_rows) < w.shape[0]:
        module = _mixed(w, bias, wide_rows)
    else:
        module, served = _rounded(w, bias, 8), "int8"
    tied = model.get_input_embeddings().weight is head.weight
    model.set_submodule(next(n for n, m in model.named_modules() if m is head), module)
    if tied:
        embeddings_from_head(model)
    return served


def _rounded(w: torch.Tensor, bias: torch.Tensor | None, bits: int) -> QuantLinear:
    """A QuantLinear of `w` rounded to nearest: 8 bits per row or 4 bits per `HEAD_INT4_GROUP` columns."""
    group = HEAD_INT4_GROUP if bits == 4 else -1
    q = torch.empty(w.shape, dtype=torch.uint8)
    scales = torch.empty(max(1, w.shape[1] // group), w.shape[0])
    zeros = torch.empty(scales.shape, dtype=torch.int16)
    for r0 in range(0, w.shape[0], _ROW_CHUNK):
        rows = w[r0:r0 + _ROW_CHUNK].float()         # a copy: the tied table may still be in use
        q[r0:r0 + _ROW_CHUNK], scales[:, r0:r0 + _ROW_CHUNK], zeros[:, r0:r0 + _ROW_CHUNK] = _round_rows(rows, bits, group)
    g_idx = torch.arange(w.shape[1]) // group if group > 0 else torch.zeros(w.shape[1], dtype=torch.int32)
    return QuantLinear(q, zeros, scales, g_idx, bias, bits, group, w.device)


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


def _mixed(w: torch.Tensor, bias: torch.Tensor | None, wide_rows: torch.Tensor) -> MixedHead:
    """The mixed head of `w`: rows `wide_rows` in int8, the others in int4."""
    rest = torch.ones(w.shape[0], dtype=torch.bool)
    rest[wide_rows] = False
    narrow_rows = rest.nonzero().view(-1)

    def part(rows: torch.Tensor, bits: int) -> QuantLinear:
        return _rounded(w[rows.to(w.device)], None if bias is None else bias[rows.to(bias.device)], bits)

    return MixedHead(part(wide_rows, 8), part(narrow_rows, 4), wide_rows, narrow_rows)


def likely_rows(mass: torch.Tensor, share: float) -> torch.Tensor:
    """The fewest rows (sorted ids) whose `mass` adds up to `share` of the total: at least one."""
    order = mass.argsort(descending=True)
    cumulative = mass[order].cumsum(0)
    count = int(torch.searchsorted(cumulative, share * cumulative[-1])) + 1
    return order[:min(count, len(order))].sort().values


@torch.inference_mode()
def token_mass(model: torch.nn.Module, steps: int, seed: int = 0) -> torch.Tensor:
    """Summed next-token probabilities ([V] float64, on CPU) over `steps` tokens the model samples from
    its BOS token (or token 0), with a fixed seed: which tokens it finds likely, without data."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    bos = model.config.bos_token_id
    ids = torch.tensor([[bos if isinstance(bos, int) else 0]], device=device)
    cache, mass = cache_kwargs(model), None          # the cache object grows in place
    for _ in range(steps):
        out = model(input_ids=ids, use_cache=True, **cache)
        p = out.logits[0, -1].float().softmax(-1).cpu()
        mass = p.double() if mass is None else mass.add_(p)
        ids = torch.multinomial(p, 1, generator=generator).view(1, 1).to(device)
    return mass
