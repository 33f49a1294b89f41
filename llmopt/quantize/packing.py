"""The standard GPTQ on-disk layout: packing integer codes into int32 words and back.

Per quantized Linear with `in_features` K, `out_features` N, `bits` b and group size g
(G = ceil(K / g) groups, or 1 for per-channel):

- `qweight` int32 [K * b / 32, N]: the codes of W^T packed along the input dimension;
- `qzeros`  int32 [G, N * b / 32]: the zero points packed along the output dimension;
- `scales`  fp16  [G, N];
- `g_idx`   int32 [K]: the group of each input column.

Codes are packed as one little-endian bit stream, LSB first: value j of a column occupies bits
j*b .. j*b+b-1 of the stream, so for b = 2, 4, 8 each word holds 32/b whole values and for b = 3
every 32 values fill 3 words, two of them straddling a word boundary (the layout AutoGPTQ
introduced and GPTQModel / vLLM read).

Zero points: the classic `gptq` format stores `zero - 1` (a historical off-by-one every reader
adds back); `gptq_v2` stores the true zero. The classic form cannot store zero = 0, which only
asymmetric quantization produces, so asymmetric checkpoints are written as `gptq_v2`.
The weight is `W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]`.
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 8)
UNPACK_COLS = 4096     # columns unpacked at a time
FORMATS = ("gptq", "gptq_v2")


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def packable(n: int, bits: int) -> bool:
    """Whether n values of `bits` bits fill whole int32 words (n a multiple of 32 always is)."""
    return n * bits % 32 == 0


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [R, C] (0 <= v < 2**bits) along dim 0 into int32 [R * bits / 32, C]."""
    _check_bits(bits)
    rows, cols = values.shape
    if not packable(rows, bits):
        raise ValueError(f"{rows} rows of {bits}-bit values do not fill whole 32-bit words")
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    offset = torch.arange(rows, dtype=torch.int64) * bits
    word, shift = offset // 32, (offset % 32).unsqueeze(1)
    words = torch.zeros(rows * bits // 32 + 1, cols, dtype=torch.int64)
    words.index_add_(0, word, (v << shift) & 0xFFFFFFFF)
    # a value that straddles a word boundary leaves its high bits in the next word
    spill = (shift + bits > 32).squeeze(1)
    if spill.any():
        words.index_add_(0, word[spill] + 1, v[spill] >> (32 - shift[spill]))
    words = words[:-1]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [W, C] -> codes int32 [W * 32 / bits, C] (first `rows` kept).
    Columns go in blocks of UNPACK_COLS so the int64 work stays small next to the result (a 49152-row
    output head would otherwise take several times its own size while loading)."""
    _check_bits(bits)
    n = packed.shape[0] * 32 // bits
    rows = n if rows is None else rows
    out = torch.empty(rows, packed.shape[1], dtype=torch.int32, device=packed.device)
    for c in range(0, packed.shape[1], UNPACK_COLS):
        out[:, c: c + UNPACK_COLS] = _unpack_block(packed[:, c: c + UNPACK_COLS], bits, rows)
    return out


def _unpack_block(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    u = packed.to(torch.int64) & 0xFFFFFFFF
    u = torch.cat([u, torch.zeros_like(u[:1])])
    offset = torch.arange(rows, dtype=torch.int64, device=packed.device) * bits
    word, shift = offset // 32, (offset % 32).unsqueeze(1)
    v = u[word] >> shift
    if bits == 3:   # the only width whose values straddle words
        v = v | (u[word + 1] << (32 - shift))
    return (v & ((1 << bits) - 1)).to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [R, C] along dim 1 into int32 [R, C * bits / 32] (the `qzeros` direction)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int | None = None) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


def pack_layer(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
               fmt: str) -> dict[str, torch.Tensor]:
    """Tensors of one Linear in the standard layout.

    q: codes [N, K] (out x in, like the weight); scales, zeros: [G, N]; g_idx: [K].
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt}")
    stored = zeros.to(torch.int64) - (1 if fmt == "gptq" else 0)
    if fmt == "gptq" and stored.min() < 0:
        raise ValueError("zero point 0 cannot be stored in the classic gptq format; use gptq_v2")
    return {
        "qweight": pack_rows(q.t().contiguous(), bits),
        "qzeros": pack_cols(stored, bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_layer(tensors: dict[str, torch.Tensor], bits: int, fmt: str, in_features: int, out_features: int,
                 group_size: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] int32, zeros [G, N] int32 true zeros, scales [G, N] float32, g_idx [K] int64)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown GPTQ checkpoint format '{fmt}'")
    q = unpack_rows(tensors["qweight"], bits, in_features).t().contiguous()
    zeros = unpack_cols(tensors["qzeros"], bits, out_features)
    if fmt == "gptq":
        zeros = zeros + 1
    scales = tensors["scales"].float()
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = default_g_idx(in_features, group_size)
    return q, zeros, scales, g_idx.to(torch.int64)


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] = (q - zeros[g_idx]^T) * scales[g_idx]^T."""
    z = zeros.t()[:, g_idx].to(torch.float32)
    s = scales.t()[:, g_idx].to(torch.float32)
    return ((q.to(torch.float32) - z) * s).to(dtype)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Column k belongs to group k // group_size (or group 0 for per-channel)."""
    if group_size <= 0:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)
