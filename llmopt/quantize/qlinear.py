"""The runtime Linear for GPTQ-layout weights, on PyTorch's native weight-only kernels.

Which path a layer takes is decided once, when it is built:

- 4 bits on CPU: `aten._weight_int4pack_mm_for_cpu`; on CUDA: `aten._weight_int4pack_mm` (tinygemm).
  Both compute W = (q - 8) * scale + zero_f per group, so GPTQ's integer zero z becomes the float
  zero point zero_f = (8 - z) * scale at load time. The kernels want groups of 32/64/128/256
  columns: per-channel scales are repeated over groups of 128, groups larger than 256 over
  groups of 256. The input dimension is padded to whole kernel groups (and tiles on CUDA),
  the output dimension to whole kernel blocks (64 on CPU, 8 on CUDA); padded columns meet
  zero-padded inputs, so whatever they hold adds nothing.
  Checkpoints whose `g_idx` is not in group order (act-order without static groups, written by
  other tools) get their weight columns sorted once and each input gathered in the same order.
- 8 bits, one group per output channel: `aten._weight_int8pack_mm` (CPU) with codes q - 128 and
  a per-channel correction term when a zero point is not 128 (asymmetric).
- anything else (2/3 bits, 8 bits with groups, group sizes the kernels lack): the codes stay
  packed (repacked with the input dimension padded to a multiple of 32, true zeros as int16) and
  are dequantized on every call.

The CPU kernels are only fast with bfloat16 activations, so inputs are cast to bfloat16 and the
result back. They win at decode but lose to a BLAS GEMM at prefill, so on CPU from `DEQUANT_MIN_ROWS`
rows `forward` takes `forward_dequant`: the weight is dequantized on every call straight from the
kernel's packed buffer (nibbles split with masks and shifts, scales broadcast per group, in chunks of
output rows that stay in cache; nothing cached, so memory stays at 4 bits per weight plus the scales)
and multiplied by the GEMM in `dequant_dtype()`: bfloat16 where the CPU has native bf16 dot products
(oneDNN runs it at about 2x fp32), float32 elsewhere. On CUDA, from `CUDA_DEQUANT_MIN_ROWS` rows, large
int4 layers likewise dequantize from tinygemm's buffer (`llmopt.quantize.tinygemm`) and call cuBLAS.
Kernel-free layers (2/3 bits, grouped 8 bits) always dequantize, with the same word-at-a-time unpack, and
multiply in the input's dtype.
A small kernel call (a few rows on a weight of at most about 1 MB) runs on one CPU thread: with OpenMP's
passive waiting, waking the other threads costs more than they save (2-4x on SmolLM2's layers at decode).
Measured speeds and the crossovers: docs/runtime.md.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from llmopt import one_thread
from llmopt.quantize import packing, tinygemm

# rows (tokens) from which the CPU forward dequantizes + runs the BLAS GEMM instead of calling the kernels;
# None: never. Measured by `OMP_WAIT_POLICY=passive python benchmarks/gptq_kernels.py --repeat 5 --budget 2`:
# one decoder layer's Linears cross over at 128 rows, the head at 256 (docs/runtime.md).
DEQUANT_MIN_ROWS: int | None = 128
# the same on CUDA, where int4 layers of at least CUDA_DEQUANT_MIN_WEIGHTS weights dequantize from tinygemm's
# buffer (`llmopt.quantize.tinygemm`) and multiply with cuBLAS. Measured on an H200 with Llama-3.2-1B's shapes
# (`benchmarks/cuda_bench.py`, docs/runtime.md): tinygemm's time grows with the rows, dequantizing costs about
# the same at any row count, so it wins from 256 rows on the MLP's 16.8M-weight layers and never on the
# 1-4M-weight attention projections
CUDA_DEQUANT_MIN_ROWS: int | None = 256
CUDA_DEQUANT_MIN_WEIGHTS = 1 << 24
# dtype the dequantize path multiplies in on CPU; None: bfloat16 where the CPU has native bf16 dot products
# (oneDNN's bf16 GEMM runs at about 2x fp32 there), float32 elsewhere
DEQUANT_DTYPE: torch.dtype | None = None
# output rows dequantized at a time for the large layers (the head), so a chunk stays in cache
_DEQUANT_CHUNK = 4096
# a kernel call with at most this many rows on a weight of at most this many bytes runs on one thread: with
# OpenMP's passive waiting, waking the others costs more than they save (benchmarks/decode_threads.py)
ONE_THREAD_MAX_ROWS = 8
ONE_THREAD_MAX_BYTES = 1_000_000
_KERNEL_GROUPS = (32, 64, 128, 256)
_CPU_BLOCK_N = 64          # output rows are padded to this; the kernel's own blocks (_cpu_block) divide it


@functools.cache
def _cpu_block() -> int:
    """Output rows per block of `_convert_weight_to_int4pack_for_cpu`'s layout: 64 on CPUs with AVX-512,
    32 on AVX2 and others (it follows the vector width). Read off a packed probe, not assumed."""
    rows = torch.arange(_CPU_BLOCK_N, dtype=torch.int32)
    probe = torch.stack([rows % 16, rows // 16], dim=1)                      # [64, 2]: each row's codes differ
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1)
    for block in (64, 32, 16):
        b = packed.view(_CPU_BLOCK_N // block, 2, block // 2)
        codes = torch.cat([b & 15, b >> 4], dim=-1).transpose(1, 2).reshape(_CPU_BLOCK_N, 2)
        if torch.equal(codes.int(), probe):
            return block
    return _CPU_BLOCK_N        # unknown: the check in _init_int4 then turns the cheap reading off


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


@functools.cache
def _native_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (Linux's flags; False when unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def dequant_dtype(device_type: str = "cpu", input_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype the dequantize path multiplies in: `DEQUANT_DTYPE`, else bf16 on CPUs with native bf16."""
    if device_type != "cpu":
        return input_dtype
    if DEQUANT_DTYPE is not None:
        return DEQUANT_DTYPE
    return torch.bfloat16 if _native_bf16() else torch.float32


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _group_order(g_idx: torch.Tensor, group_size: int, k: int) -> tuple[torch.Tensor | None, int | None]:
    """(column permutation or None, kernel group size or None when the kernels cannot be used)."""
    g_idx = g_idx.long()
    perm = None
    if (g_idx[1:] < g_idx[:-1]).any():
        perm = torch.argsort(g_idx, stable=True)
        g_idx = g_idx[perm]
    if group_size <= 0 or int(g_idx.max()) == 0:
        return perm, (128 if int(g_idx.max()) == 0 else None)
    if not torch.equal(g_idx, torch.arange(k) // group_size):
        return perm, None
    if group_size in _KERNEL_GROUPS:
        return perm, group_size
    if group_size > 256 and group_size % 256 == 0:
        return perm, 256
    return perm, None


class QuantLinear(torch.nn.Module):
    """y = x W^T + b with W stored as GPTQ codes; see the module docstring for the paths."""

    def __init__(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, group_size: int, device: torch.device | str = "cpu",
                 use_kernels: bool = True) -> None:
        """q [N, K] codes, zeros [G, N] true integer zeros, scales [G, N], g_idx [K]."""
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size = bits, group_size
        self.device_type = device.type
        self.register_buffer("bias", None if bias is None else bias.detach().to(device))
        self.perm: torch.Tensor | None = None
        self.mode = "dequant"
        self.cheap_dequant = False           # int4: the weight can be read back from the kernel's buffer
        if use_kernels:
            if bits == 4:
                self._init_int4(q, zeros, scales, g_idx, device)
            elif bits == 8 and int(g_idx.max()) == 0 and device.type == "cpu" and _op("_weight_int8pack_mm"):
                self._init_int8(q, zeros, scales, device)
        if self.mode == "dequant":
            self._init_dequant(q, zeros, scales, g_idx, device)
        # one token on CPU takes `forward_token`: the kernel with nothing to permute, pad, slice or correct
        self.token_path = self.device_type == "cpu" and self.perm is None and (
            (self.mode == "int4" and (self.k_pad, self.n_pad) == (self.in_features, self.out_features))
            or (self.mode == "int8" and self.zero_shift is None))

    # ----------------------------------------------------------------------------------- building

    def _init_int4(self, q, zeros, scales, g_idx, device) -> None:
        cuda = device.type == "cuda"
        if not _op("_weight_int4pack_mm" if cuda else "_weight_int4pack_mm_for_cpu"):
            return
        perm, kg = _group_order(g_idx, self.group_size, self.in_features)
        if kg is None:
            return
        n, k = q.shape
        g = g_idx.long()
        if perm is not None:
            q, g = q[:, perm], g[perm]
        kp = _ceil_to(k, max(kg, 128) if cuda else kg)
        np_ = _ceil_to(n, 8 if cuda else _CPU_BLOCK_N)
        codes = torch.full((np_, kp), 8, dtype=torch.int32)
        codes[:n, :k].copy_(q)
        # per kernel group: the original group of its first column
        first = torch.arange(0, kp, kg).clamp(max=k - 1)
        s = scales.float()[g[first]]                      # [Kp/kg, N]
        z = zeros.float()[g[first]]
        sz = torch.zeros(kp // kg, np_, 2)
        sz[..., 0] = 1.0
        sz[:, :n, 0] = s
        sz[:, :n, 1] = (8 - z) * s
        if cuda:
            w = tinygemm.convert(codes, device)
        else:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.register_buffer("w_int4", w.to(device))
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16).contiguous().to(device))
        self.kernel_group, self.k_pad, self.n_pad = kg, kp, np_
        self.perm = perm.to(device) if perm is not None else None
        self.mode = "int4"
        self.kernel_bytes = self.w_int4.numel() * self.w_int4.element_size()
        # prefill dequantizes from the kernel's own buffer; check that we read its layout right
        if cuda:     # the whole layer: the kernel's tile order was learned, not documented
            order = tinygemm.tile_order(device)
            self.cheap_dequant = order is not None and torch.equal(
                tinygemm.codes(self.w_int4, order, np_, kp), codes.to(torch.uint8).to(device))
            self.register_buffer("tile_order", order, persistent=False)
        else:        # the first and last blocks of rows (the layout repeats per block; a whole head takes seconds)
            self.cpu_block = _cpu_block()     # an attribute: a compiled graph reads it, not the probe's ops
            probe = torch.cat([torch.arange(min(np_, 2 * _CPU_BLOCK_N)), torch.arange(max(0, np_ - _CPU_BLOCK_N), np_)])
            self.cheap_dequant = torch.equal(self.int4_codes_of_rows(probe.to(device)).to(torch.int32).cpu(),
                                             codes[probe])
        self.zero_offsets = bool((sz[..., 1] != 0).any())   # symmetric layers skip the add

    def _init_int8(self, q, zeros, scales, device) -> None:
        s = scales.float()[0]                             # [N]
        z = zeros[0].long()
        # int16 scratch, not int64: for a vocabulary-sized head the difference is hundreds of MB of peak memory
        self.register_buffer("w_int8", (q.to(torch.int16) - 128).to(torch.int8).contiguous().to(device))
        self.register_buffer("scales_bf16", s.to(torch.bfloat16).to(device))
        shift = (z - 128).float() * s.to(torch.bfloat16).float()
        self.register_buffer("zero_shift", shift.to(device) if bool((z != 128).any()) else None)
        self.mode = "int8"
        self.kernel_bytes = self.w_int8.numel()

    def _init_dequant(self, q, zeros, scales, g_idx, device) -> None:
        k = self.in_features
        kp = _ceil_to(k, 32)   # whole words for every width
        codes = torch.zeros(kp, self.out_features, dtype=torch.int32)
        codes[:k] = q.t()
        self.register_buffer("qweight", packing.pack_rows(codes, self.bits).to(device))
        self.register_buffer("zeros", zeros.to(torch.int16).to(device))
        self.register_buffer("scales", scales.to(torch.float16).to(device))
        self.register_buffer("g_idx", g_idx.to(torch.int32).to(device))
        g = g_idx.long()
        rows = k // zeros.shape[0]
        in_order = k % zeros.shape[0] == 0 and torch.equal(g, torch.arange(k) // rows)
        self.group_rows = rows if in_order else None   # None: scales gathered through g_idx

    # ----------------------------------------------------------------------------------- reading

    def _int4_codes_t(self) -> torch.Tensor:
        """Codes [Kp, Np] (transposed) read back from the CPU kernel's buffer: blocks of B output rows
        (`cpu_block`); byte j of each input row holds row j in its low nibble and row B/2 + j in its high one."""
        block = self.cpu_block
        b = self.w_int4.view(self.n_pad // block, self.k_pad, block // 2)
        codes = torch.cat([b & 15, b >> 4], dim=-1)       # [Nb, Kp, B]
        return codes.transpose(0, 1).reshape(self.k_pad, self.n_pad)

    def int4_codes_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Codes [M, Kp] of output rows `rows` (int64 [M]) from the CPU kernel's buffer (`_int4_codes_t`'s
        layout; on CUDA tinygemm's), without unpacking the others: a tied embedding's lookup."""
        if self.device_type == "cuda":
            return tinygemm.codes_of_rows(self.w_int4, self.tile_order, rows, self.n_pad, self.k_pad)
        block = self.cpu_block
        b = self.w_int4.view(self.n_pad // block, self.k_pad, block // 2)
        within = rows % block
        raw = b[rows // block, :, within % (block // 2)]                    # [M, Kp]
        return torch.where((within < block // 2).unsqueeze(1), raw & 15, raw >> 4)

    def _int4_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """W [r1 - r0, Kp] in `dtype` for output rows r0:r1 (multiples of 64), from the CPU kernel's buffer:
        nibbles split straight into W's row order (one strided pass over the packed bytes), then
        W = (q - 8) * scale + zero_f per group, as the kernel computes it."""
        block = self.cpu_block
        b = self.w_int4.view(self.n_pad // block, self.k_pad, block // 2)[r0 // block: r1 // block]
        b = b.transpose(1, 2)                             # [blocks, B/2, Kp]
        codes = torch.empty(b.shape[0], 2, block // 2, self.k_pad, dtype=torch.uint8, device=b.device)
        torch.bitwise_and(b, 15, out=codes[:, 0])
        torch.bitwise_right_shift(b, 4, out=codes[:, 1])
        w = codes.view(torch.int8).sub_(8).to(dtype).view(r1 - r0, -1, self.kernel_group)
        sz = self.scales_zeros[:, r0:r1].to(dtype)        # [Kp/kg, rows, 2]
        w.mul_(sz[..., 0].t().unsqueeze(2))
        if self.zero_offsets:
            w.add_(sz[..., 1].t().unsqueeze(2))
        return w.view(r1 - r0, self.k_pad)

    def _int4_weight_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        """W [Np, Kp] in `dtype` from tinygemm's buffer: W = (q - 8) * scale + zero_f per group, as it computes."""
        q = tinygemm.codes(self.w_int4, self.tile_order, self.n_pad, self.k_pad)
        sz = self.scales_zeros.float()                    # [Kp/kg, Np, 2]
        scale, offset = sz[..., 0].t().unsqueeze(2), (sz[..., 1] - 8 * sz[..., 0]).t().unsqueeze(2)
        w = torch.addcmul(offset.to(dtype).contiguous(), q.view(self.n_pad, -1, self.kernel_group),
                          scale.to(dtype).contiguous())
        return w.reshape(self.n_pad, self.k_pad)

    def _unpacked_codes_t(self) -> torch.Tensor:
        """Codes [Kp, N] of the dequant path's `qweight`, whole words at a time with shifts and masks."""
        words, bits = self.qweight, self.bits
        n = words.shape[1]
        if bits != 3:
            shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, -1, 1)
            return ((words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).view(-1, n)
        # 32 values fill 3 words: values 0..20 lie in bits 0..62 of words 0-1, values 21..31 in bits 31..95
        w = words.view(-1, 3, n).to(torch.int64) & 0xFFFFFFFF
        lo, hi = w[:, 0] | w[:, 1] << 32, w[:, 1] | w[:, 2] << 32
        shifts = torch.arange(0, 96, 3, device=words.device).view(1, -1, 1)
        low = (lo.unsqueeze(1) >> shifts[:, :21]) & 7
        high = (hi.unsqueeze(1) >> (shifts[:, 21:] - 32)) & 7
        return torch.cat([low, high], 1).view(-1, n)

    def _dequant_codes_t(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T [K, N] in `dtype` for the dequant path: (q - zero) * scale, one rounding in `dtype`."""
        q = self._unpacked_codes_t()[: self.in_features].to(dtype)
        s, z = self.scales.to(dtype), self.zeros.to(dtype)
        if self.group_rows is None:
            g = self.g_idx.long()
            return q.sub_(z[g]).mul_(s[g])
        qv = q.view(-1, self.group_rows, self.out_features)
        qv.sub_(z.unsqueeze(1)).mul_(s.unsqueeze(1))
        return q

    def dequantized_weight_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W^T [K, N] in `dtype`, in the column order the forward uses (after `perm`)."""
        if self.mode == "int4":
            if self.cheap_dequant and self.device_type == "cuda":
                return self._int4_weight_cuda(dtype).t()[: self.in_features, : self.out_features]
            if self.cheap_dequant:
                return self._int4_rows(0, self.n_pad, dtype).t()[: self.in_features, : self.out_features]
            else:   # read the layout back through the kernel itself (identity input)
                eye = torch.eye(self.k_pad, dtype=torch.bfloat16, device=self.w_int4.device)
                ones = self.scales_zeros.clone()
                ones[..., 0], ones[..., 1] = 1.0, 8.0
                codes = self._kernel_int4(eye, ones).round()
            sz = self.scales_zeros.float()                # [Kp/kg, Np, 2]
            scale, offset = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]
            q = codes.to(dtype).view(-1, self.kernel_group, self.n_pad)
            w = torch.addcmul(offset.to(dtype).unsqueeze(1), q, scale.to(dtype).unsqueeze(1))
            return w.view(self.k_pad, self.n_pad)[: self.in_features, : self.out_features]
        if self.mode == "int8":
            w = self.w_int8.to(dtype) * self.scales_bf16.to(dtype).unsqueeze(1)
            if self.zero_shift is not None:
                w = w - self.zero_shift.to(dtype).unsqueeze(1)
            return w.t()
        return self._dequant_codes_t(dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] (a transposed view)."""
        return self.dequantized_weight_t(dtype).t()

    # ----------------------------------------------------------------------------------- forward

    def _kernel_int4(self, x2: torch.Tensor, sz: torch.Tensor | None = None) -> torch.Tensor:
        sz = self.scales_zeros if sz is None else sz
        if self.device_type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x2, self.w_int4, self.kernel_group, sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.w_int4, self.kernel_group, sz)

    def _kernel_int8(self, xb: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(xb, self.w_int8, self.scales_bf16)

    def _one_thread(self, rows: int) -> bool:
        """Whether this call is small enough that waking the other CPU threads may cost more than they save
        (`llmopt.one_thread` measures whether it does)."""
        return self.device_type == "cpu" and rows <= ONE_THREAD_MAX_ROWS and self.kernel_bytes <= ONE_THREAD_MAX_BYTES

    def _kind(self, rows: int) -> tuple:
        """What a thread-count measurement of a kernel call stands for (`llmopt.one_thread`)."""
        return self.mode, self.kernel_bytes, self.k_pad if self.mode == "int4" else self.in_features, rows

    def _eager_kernel(self, xb: torch.Tensor) -> torch.Tensor:
        """The kernel call outside a compiled graph: on the thread count measured faster for a small one."""
        kernel = self._kernel_int4 if self.mode == "int4" else self._kernel_int8
        if self._one_thread(xb.shape[0]) and torch.get_num_threads() > 1:
            return one_thread.call_small(self._kind(xb.shape[0]), kernel, xb)
        return kernel(xb)

    def _call_kernel(self, xb: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return self._eager_kernel(xb)
        kernel = self._kernel_int4 if self.mode == "int4" else self._kernel_int8
        small = self._one_thread(xb.shape[0])
        key = self._kind(xb.shape[0])
        # a compiled step runs on one thread (llmopt.compiled); where eager calls measured faster on all, so is this
        if self.device_type != "cpu" or (small and one_thread.faster_alone(key) is not False):
            return kernel(xb)
        if self.mode == "int4":                       # a large call takes every thread back, opaquely
            return one_thread.int4_mm(xb, self.w_int4, self.kernel_group, self.scales_zeros)
        return one_thread.int8_mm(xb, self.w_int8, self.scales_bf16)

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-only kernel path, whatever the number of rows."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.mode not in ("int4", "int8"):
            return self.forward_dequant(x)
        xb = x2.to(torch.bfloat16)
        if self.mode == "int4" and self.k_pad != self.in_features:
            xb = F.pad(xb, (0, self.k_pad - self.in_features))
        y = self._call_kernel(xb.contiguous())
        if self.mode == "int4":
            y = y[:, : self.out_features]
        elif self.zero_shift is not None:
            y = y - xb.float().sum(-1, keepdim=True) * self.zero_shift
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _int4_dequant_mm(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x2 [M, K] @ W^T with W dequantized in chunks of output rows (a chunk stays in cache)."""
        xd = x2.to(dtype)
        if self.k_pad != self.in_features:
            xd = F.pad(xd, (0, self.k_pad - self.in_features))
        y = torch.empty(xd.shape[0], self.n_pad, dtype=dtype, device=xd.device)
        for r0 in range(0, self.n_pad, _DEQUANT_CHUNK):
            r1 = min(r0 + _DEQUANT_CHUNK, self.n_pad)
            torch.mm(xd, self._int4_rows(r0, r1, dtype).t(), out=y[:, r0:r1])
        return y[:, : self.out_features]

    def forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize the weight on every call (nothing cached, so memory stays at the packed size) and
        multiply with the BLAS GEMM: int4/int8 layers in `dequant_dtype()` (their kernels already round the
        activations to bf16), the kernel-free layers in the input's dtype (exact for float32 inputs)."""
        shape = x.shape
        dtype = dequant_dtype(x.device.type, x.dtype) if self.mode != "dequant" else x.dtype
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.mode == "int4" and self.cheap_dequant and self.device_type == "cpu":
            y = self._int4_dequant_mm(x2, dtype)
        else:
            y = torch.mm(x2.to(dtype), self.dequantized_weight_t(dtype))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def forward_token(self, x: torch.Tensor) -> torch.Tensor:
        """`forward_kernel` for one token of a `token_path` layer, in as few calls as it takes (the same
        operations): at decode a small layer's kernel call takes tens of microseconds, and the general
        path's bookkeeping around it cost milliseconds per 4-bit SmolLM2-135M step (docs/runtime.md)."""
        xb = x.reshape(1, self.in_features).to(torch.bfloat16).contiguous()
        y = self._eager_kernel(xb).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_path and x.numel() == self.in_features and not torch.compiler.is_compiling():
            return self.forward_token(x)
        rows = x.numel() // self.in_features
        if self.device_type == "cpu":
            big = DEQUANT_MIN_ROWS is not None and rows >= DEQUANT_MIN_ROWS
        else:
            big = (CUDA_DEQUANT_MIN_ROWS is not None and rows >= CUDA_DEQUANT_MIN_ROWS and self.cheap_dequant
                   and self.n_pad * self.k_pad >= CUDA_DEQUANT_MIN_WEIGHTS)
        if self.mode == "dequant" or big:
            return self.forward_dequant(x)
        return self.forward_kernel(x)

    # ----------------------------------------------------------------------------------- facts

    def n_logical_params(self) -> int:
        """Parameters this layer stands for (the packed buffers hide them from a plain count)."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, mode={self.mode}")
