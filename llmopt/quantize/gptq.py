"""The GPTQ solver for one Linear layer (Frantar et al., 2022), and round-to-nearest for comparison.

GPTQ quantizes the columns (input channels) of W one at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian H^-1 of the layer's
squared output error, H = 2 X X^T over the calibration inputs X. The Cholesky factor of H^-1 gives
the update rows directly; updates are applied lazily, one block of columns at a time, so the big
matrix products run on blocks instead of single columns.

Act-order (`desc_act`) quantizes columns in decreasing order of diag(H) (the most active inputs
first, while the most freedom is left to absorb their error). Groups stay *static*: every group's
scale and zero are fixed from the original column order before the reordering, so the
checkpoint's `g_idx` is simply k // group_size and inference needs no reordering at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


# Range search (the reference implementation's `mse` option): shrink each group's range by up to
# MAX_SHRINK in GRID steps and keep, per row, the grid whose rounding error has the lowest NORM-norm.
# Clipping a few large weights buys a finer step for all the others.
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128      # -1: one group per output channel
    sym: bool = True
    mse: bool = False          # search each group's range for the lowest rounding error

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


@dataclass
class LayerResult:
    """One quantized Linear: codes and parameters in original column order, plus how well it went."""

    q: torch.Tensor            # [N, K] int32 codes
    scales: torch.Tensor       # [G, N] float32
    zeros: torch.Tensor        # [G, N] int32 (true zero points)
    g_idx: torch.Tensor        # [K] int32
    error: float               # relative output error on the calibration inputs (weight error for RTN)
    damp: float | None = None  # dampening finally used (fraction of mean diag H)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        return ((self.q.float() - self.zeros.t()[:, g].float()) * self.scales.t()[:, g]).to(dtype)


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (xmax - xmin) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return scale, zero


def quant_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero per row of w [N, C]: min/max (the range always includes 0), or with
    `spec.mse` the shrunk range with the lowest rounding error."""
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale, zero = _grid(xmin, xmax, spec)
    if spec.mse:
        shrink = 1 - torch.arange(int(CLIP_MAX_SHRINK * CLIP_GRID), device=w.device) / CLIP_GRID
        best = torch.full_like(scale, float("inf"))
        step = max(1, (1 << 22) // max(w.numel(), 1))      # shrink factors per batch: ~16 MB of work
        rows = torch.arange(w.shape[0], device=w.device)
        for chunk in shrink.split(step):
            s, z = _grid(chunk[:, None] * xmin, chunk[:, None] * xmax, spec)      # [S, N]
            sc, zc = s[..., None], z[..., None]
            # in place: the same arithmetic as clamp(round(w / s) + z) dequantized, minus w
            err = (w / sc).round_().add_(zc).clamp_(0, spec.maxq).sub_(zc).mul_(sc).sub_(w)
            err = err.abs_().pow_(CLIP_NORM).sum(-1)
            low, at = err.min(0)                             # first (widest) range wins ties
            better = low < best
            best = torch.where(better, low, best)
            scale = torch.where(better, s[at, rows], scale)
            zero = torch.where(better, z[at, rows], zero)
    return scale, zero


def _quantize_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def _n_groups(k: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(k / group_size)


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> LayerResult:
    """Round-to-nearest with the same grid as GPTQ; error = ||W - Q||^2 / ||W||^2."""
    w = weight.detach().float()
    n, k = w.shape
    g = spec.group_size if spec.group_size > 0 else k
    ng = _n_groups(k, spec.group_size)
    scales = torch.empty(ng, n)
    zeros = torch.empty(ng, n)
    q = torch.empty(n, k)
    for j in range(ng):
        cols = slice(j * g, min((j + 1) * g, k))
        s, z = quant_params(w[:, cols], spec)
        scales[j], zeros[j] = s, z
        q[:, cols] = torch.clamp(torch.round(w[:, cols] / s[:, None]) + z[:, None], 0, spec.maxq)
    g_idx = (torch.arange(k) // g if spec.group_size > 0 else torch.zeros(k, dtype=torch.long)).to(torch.int32)
    result = LayerResult(q.to(torch.int32), scales, zeros.to(torch.int32), g_idx, 0.0)
    err = result.dequantize() - w
    result.error = float((err.pow(2).sum() / w.pow(2).sum().clamp(min=1e-30)).item())
    return result


def _inverse_cholesky(h: torch.Tensor, damp: float, note: Callable[[str], None] | None
                      ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)^-1, raising λ tenfold until the factorisation succeeds."""
    mean_diag = torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    tried = damp
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + tried * mean_diag * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                if tried != damp and note is not None:
                    note(f"Hessian not positive definite at damp {damp:g}; used damp {tried:g}")
                return upper, tried
        tried = tried * 10 if tried > 0 else 0.01
    raise RuntimeError(f"Cholesky factorisation failed even with damp {tried / 10:g}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                  block_size: int = 128, desc_act: bool = False,
                  note: Callable[[str], None] | None = None) -> LayerResult:
    """Quantize W [N, K] given H [K, K] (fp32, on W's device). Returns codes in original column order."""
    w0 = weight.detach().float()
    n, k = w0.shape
    h = hessian.float().clone()
    w = w0.clone()
    maxq = spec.maxq
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    g = spec.group_size if spec.group_size > 0 else k
    ng = _n_groups(k, spec.group_size)
    col_group = torch.arange(k, device=w.device) // g
    scales = torch.empty(ng, n, device=w.device)
    zeros = torch.empty(ng, n, device=w.device)
    have = [False] * ng
    if spec.group_size <= 0 or desc_act:
        # per-channel, or static groups: parameters fixed up front from the original columns
        for j in range(ng):
            scales[j], zeros[j] = quant_params(w[:, j * g: min((j + 1) * g, k)], spec)
            have[j] = True

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h, col_group = w[:, perm], h[perm][:, perm], col_group[perm]

    hinv, used = _inverse_cholesky(h, damp, note)
    # a group must never span two lazy blocks, so its parameters see all updates made so far
    bs = max(block_size, 1) if desc_act or spec.group_size <= 0 else max(block_size // g, 1) * g
    q = torch.zeros(n, k, device=w.device)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            gi = int(col_group[i1 + i])
            if not have[gi]:       # lazy groups (no act-order): first column of the group
                scales[gi], zeros[gi] = quant_params(w1[:, i: i + g], spec)
                have[gi] = True
            col = w1[:, i]
            qc, deq = _quantize_col(col, scales[gi], zeros[gi], maxq)
            q[:, i1 + i] = qc
            e = (col - deq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    g_idx = (torch.arange(k) // g if spec.group_size > 0 else torch.zeros(k, dtype=torch.long)).to(torch.int32)
    result = LayerResult(q.to(torch.int32).cpu(), scales.cpu(), zeros.to(torch.int32).cpu(), g_idx, 0.0, used)
    result.error = relative_output_error(w0, result.dequantize().to(w0.device), hessian)
    return result


def relative_output_error(w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Ŵ) X||² / ||W X||², computed from H = 2 X X^T / n without the inputs."""
    e = (w - wq).float()
    h = hessian.float()
    num = ((e @ h) * e).sum()
    den = ((w.float() @ h) * w.float()).sum().clamp(min=1e-30)
    return float((num / den).item())


class HessianAccumulator:
    """Running average of 2 x x^T over all tokens seen, in fp32."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        total = self.tokens + m
        self.h.mul_(self.tokens / total)
        self.h.addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens = total
