"""What the CPU can do fast, for choices that depend on it (the GEMM dtype of dequantized layers,
mixed precision in training)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch


@functools.cache
def native_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (Linux's flags; False when unknown): there a
    bf16 GEMM is about twice float32's, elsewhere many times slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
