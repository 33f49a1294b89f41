"""GPTQ codes -> GGML quantized blocks, exactly where the two grids coincide.

GGML's Q4_0, Q4_1 and Q8_0 store each row in blocks of 32 consecutive weights with one fp16 scale d
(Q4_1 also an fp16 minimum m): Q4_0 w = d*(c - 8), c in 0..15; Q4_1 w = d*c + m, c in 0..15;
Q8_0 w = d*c, c in -128..127. A GPTQ layer w = s*(q - z), one (s, z) per group of input columns,
maps onto them when every block of 32 columns lies inside one group (a group size that is a multiple
of 32, or per channel; act-order with static groups keeps g_idx = k // group_size):

- Q4_0: d = s, c = q - z + 8: exact when q - z fits in -8..7 (every symmetric grid of 2 to 4 bits);
- Q8_0: d = s, c = q - z: exact when q - z fits in -128..127 (every symmetric grid up to 8 bits);
- Q4_1: d = s, c = q, m = -s*z rounded to fp16: GPTQ's codes and scales, the minimum off by at most
  half an fp16 step of s*z (exact when z is a power of two, as for symmetric grids).

The checkpoint stores s in fp16 already, so d adds no rounding. Anything else is dequantized and
re-rounded with gguf's reference quantizer (llama.cpp's own rounding). Every result carries its error
against the checkpoint's dequantized weight, measured by dequantizing the blocks, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from llmopt.export.source import GPTQLayer

QK = 32
# type -> offset added to q - z, and the range the stored code must fit
_CODES = {T.Q4_0: (8, 0, 15), T.Q8_0: (0, -128, 127)}


@dataclass
class Mapped:
    """One tensor ready for the GGUF writer, and how faithfully it holds the checkpoint's weight."""

    data: np.ndarray                  # quantized: uint8 [rows, bytes per row]; else float32 / float16
    qtype: T
    how: str                          # exact | codes (Q4_1 minimum rounded) | requantized | converted
    max_abs_error: float | None = None
    rel_error: float | None = None    # ||W_gguf - W|| / ||W||


def block_groups(g_idx: torch.Tensor) -> torch.Tensor | None:
    """The group of each block of 32 input columns, or None when a block straddles two groups."""
    if g_idx.numel() % QK:
        return None
    blocks = g_idx.view(-1, QK)
    return blocks[:, 0] if bool((blocks == blocks[:, :1]).all()) else None


def gptq_blocks(layer: GPTQLayer, qtype: T) -> np.ndarray | None:
    """GGML blocks [N, K/32 * type size] holding the layer's own codes and scales, or None if none can."""
    groups = block_groups(layer.g_idx)
    if groups is None or qtype not in (T.Q4_0, T.Q4_1, T.Q8_0):
        return None
    n, k = layer.q.shape
    s = layer.scales.t()[:, groups]                                  # [N, blocks]
    z = layer.zeros.t()[:, groups].to(torch.int32)
    q = layer.q.view(n, k // QK, QK)
    if qtype == T.Q4_1:
        codes, lo, hi = q, 0, 15
    else:
        offset, lo, hi = _CODES[qtype]
        codes = q - z.unsqueeze(-1) + offset
    if int(codes.min()) < lo or int(codes.max()) > hi:
        return None
    parts = [_fp16_bytes(s)]
    if qtype == T.Q4_1:
        parts.append(_fp16_bytes(-(s * z.float())))                  # exact in float32, rounded once to fp16
    if qtype == T.Q8_0:
        parts.append(codes.to(torch.int8).numpy().view(np.uint8))
    else:
        nib = codes.to(torch.uint8)
        parts.append((nib[..., :QK // 2] | (nib[..., QK // 2:] << 4)).numpy())
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def map_gptq(layer: GPTQLayer, qtype: T) -> Mapped:
    """The layer in `qtype`: its own codes where the grids coincide, else its dequantized weight re-rounded."""
    reference = layer.dequantize().numpy()
    blocks = gptq_blocks(layer, qtype)
    if blocks is None:
        mapped = convert(reference, qtype)
        mapped.how = "requantized" if qtype in (T.Q4_0, T.Q4_1, T.Q8_0) else "converted"
    else:
        mapped = Mapped(blocks, qtype, "codes")
    measure(mapped, reference)
    if blocks is not None and mapped.max_abs_error == 0.0:
        mapped.how = "exact"
    return mapped


def convert(weight: np.ndarray, qtype: T) -> Mapped:
    """A float tensor in `qtype` through gguf's reference quantizers (bit-exact with ggml's for these types)."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if qtype == T.F32:
        return Mapped(w, qtype, "converted")
    if qtype == T.F16:
        return Mapped(w.astype(np.float16), qtype, "converted")
    return Mapped(quants.quantize(w, qtype), qtype, "converted")


def dequantize(mapped: Mapped) -> np.ndarray:
    """The float32 weight llama.cpp computes with."""
    if mapped.qtype in (T.F32, T.F16):
        return mapped.data.astype(np.float32)
    return quants.dequantize(mapped.data, mapped.qtype)


def measure(mapped: Mapped, reference: np.ndarray) -> None:
    """Fill in the mapped tensor's error against the checkpoint's weight."""
    diff = dequantize(mapped).reshape(reference.shape) - reference
    mapped.max_abs_error = float(np.abs(diff).max()) if diff.size else 0.0
    norm = float(np.linalg.norm(reference))
    mapped.rel_error = float(np.linalg.norm(diff)) / norm if norm else 0.0
