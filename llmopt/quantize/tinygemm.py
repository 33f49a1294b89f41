"""The packed layout of PyTorch's CUDA int4 kernel (`aten._weight_int4pack_mm`, tinygemm), read back.

The kernel is built for a few rows of activations (decode); for a long prompt, dequantizing the weight
once and calling cuBLAS is faster (docs/runtime.md), and that needs the codes back from the kernel's
buffer. `_convert_weight_to_int4pack` stores each tile of 8 output rows by 128 input columns (8 inner
k-tiles of 16) in 128 int32 words, shuffled for the tensor cores in an order PyTorch does not document.
Rather than hard-code that order, `tile_order` learns it from the converter itself: three probe tiles
whose codes are the base-16 digits of each position are packed and read back, naming the position each
nibble holds. `QuantLinear` then checks a whole layer against its codes before it uses the reading, so a
layout that differs in some PyTorch version only turns the fast prefill off.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

INNER_K_TILES = 8
TILE_N, TILE_K = 8, 16 * INNER_K_TILES
_TILE = TILE_N * TILE_K


def convert(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The kernel's buffer for codes [N, K] (0..15; N a multiple of 8, K of 128), on `device`."""
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device)
    return torch.ops.aten._convert_weight_to_int4pack(packed, INNER_K_TILES)


def _nibbles(buf: torch.Tensor) -> torch.Tensor:
    """[tiles..., 1024] uint8: every nibble of each tile's words, low nibble of each byte first."""
    b = buf.contiguous().view(torch.uint8).reshape(*buf.shape[:2], _TILE // 2)
    return torch.stack([b & 15, b >> 4], dim=-1).view(*buf.shape[:2], _TILE)


def learn_order(convert_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """For each position p = row * 128 + column of a tile, the index of the nibble that holds it, read off
    `convert_fn` (codes [8, 128] -> buffer); None when the buffer is not one tile holding each code once."""
    pos = torch.arange(_TILE, dtype=torch.int32)
    source = torch.zeros(_TILE, dtype=torch.int64)
    for digit in range(3):                                   # 16**3 > 1024 positions
        probe = (pos // 16 ** digit % 16).view(TILE_N, TILE_K)
        buf = convert_fn(probe)
        if buf.numel() * buf.element_size() * 2 != _TILE or buf.dim() < 2:
            return None
        source += _nibbles(buf.view(1, 1, -1)).view(-1).cpu().long() * 16 ** digit
    if not torch.equal(source.sort().values, pos.long()):
        return None
    return source.argsort()


@functools.cache
def tile_order(device: torch.device) -> torch.Tensor | None:
    """`learn_order` of the real converter on `device` (once per device)."""
    order = learn_order(lambda codes: convert(codes, device))
    return None if order is None else order.to(device)


def codes(buf: torch.Tensor, order: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes [N, K] uint8 from the kernel's buffer (`n`, `k`: the padded sizes it was built with)."""
    tiles = _nibbles(buf.view(n // TILE_N, k // TILE_K, -1)).index_select(-1, order)
    return tiles.view(n // TILE_N, k // TILE_K, TILE_N, TILE_K).transpose(1, 2).reshape(n, k)


def codes_of_rows(buf: torch.Tensor, order: torch.Tensor, rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes [M, K] uint8 of output rows `rows` (int64 [M]), unpacking only their tiles: an embedding lookup."""
    tiles = buf.view(n // TILE_N, k // TILE_K, -1)[rows // TILE_N]               # [M, K/128, words]
    t = _nibbles(tiles).index_select(-1, order).view(len(rows), k // TILE_K, TILE_N, TILE_K)
    return t[torch.arange(len(rows), device=rows.device), :, rows % TILE_N].reshape(len(rows), k)
