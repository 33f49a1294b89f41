"""Importance of every coupled structure (query head, KV group, MLP channel) of every layer.

- `taylor`: first-order Taylor, the element-wise |w * dL/dw| summed over the structure (LLM-Pruner's
  element-wise score), with the LM loss of one calibration window per step. Each step's |w * g| is
  reduced to per-structure sums in fp32 right after its backward pass, so memory is the model, the
  gradients of the prunable Linear weights (embeddings, norms and the LM head get none) and one
  window's activations; no per-sample or per-element accumulators are kept.
- `obs`: refit-aware, from the calibration statistics the least-squares refit uses: the increase of
  the layer's output error when the structure is removed and the kept columns of o_proj / down_proj
  are refit (Optimal Brain Surgeon for one linear map, as ZipLM scores structures).
- `taylor-obs` (default): the product of the two. Taylor sees how the loss depends on a structure
  but not that the refit can replace it; obs sees the refit but not the loss. Their product
  removes what is both cheap for the loss and replaceable.
- `taylor2`: adds the diagonal-Fisher second-order term 0.5 * w^2 * g^2 per step.
- `l2`: the squared weights of the structure (no data needed).
- `random`: seeded uniform scores, the floor any real criterion must beat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from llmopt.models import model_device
from llmopt.progress import SILENT, Progress
from llmopt.prune.structure import Arch, Geometry, decoder_layers, module

METHODS = ("taylor-obs", "taylor", "taylor2", "obs", "l2", "random")
NEEDS_GRADIENTS = ("taylor-obs", "taylor", "taylor2")
NEEDS_GRAMS = ("taylor-obs", "obs")     # scored from the refit's calibration statistics


@dataclass
class LayerScores:
    """Higher = more important. kv holds the k/v rows only; group scores add their query heads."""

    q: torch.Tensor     # [heads]
    kv: torch.Tensor    # [kv_heads]
    mlp: torch.Tensor   # [intermediate]
    hidden: torch.Tensor | None = None   # [hidden_size]: the layer's share of each residual channel's score

    def group(self, geo: Geometry) -> torch.Tensor:
        """Score of removing a whole KV group: its k/v rows plus all the query heads that read them."""
        return self.kv + self.q.view(geo.kv_heads, geo.q_per_group).sum(1)


def _zeros(geo: Geometry) -> LayerScores:
    f = dict(dtype=torch.float32)
    return LayerScores(torch.zeros(geo.heads, **f), torch.zeros(geo.kv_heads, **f),
                       torch.zeros(geo.intermediate, **f), torch.zeros(geo.hidden, **f))


def _rows(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum an element score over row blocks: [groups * n, ...] -> [groups]."""
    return t.reshape(groups, -1).sum(1)


def _cols(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum an element score over column blocks: [out, groups * n] -> [groups]."""
    return t.reshape(t.shape[0], groups, -1).sum((0, 2))


def _layer_scores(layer: torch.nn.Module, arch: Arch, geo: Geometry,
                  element: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> LayerScores:
    """Reduce an element-wise score of the layer's prunable weights to per-structure sums, and to
    per-residual-channel sums (the columns of the projections that read the stream, the rows of
    those that write it): one element score, every axis."""

    def el(p: torch.nn.Parameter | None) -> torch.Tensor | None:
        if p is None:
            return None
        return element(p.detach().float(), None if p.grad is None else p.grad.float())

    s = _zeros(geo)
    q_lin = module(layer, arch.q)
    q, o = el(q_lin.weight), el(module(layer, arch.o).weight)
    s.q += _rows(q, geo.heads).cpu() + _cols(o, geo.heads).cpu()
    s.hidden += q.sum(0).cpu() + o.sum(1).cpu()
    if q_lin.bias is not None:
        s.q += _rows(el(q_lin.bias), geo.heads).cpu()
    for name in (arch.k, arch.v):
        lin = module(layer, name)
        e = el(lin.weight)
        s.kv += _rows(e, geo.kv_heads).cpu()
        s.hidden += e.sum(0).cpu()
        if lin.bias is not None:
            s.kv += _rows(el(lin.bias), geo.kv_heads).cpu()
    for name in arch.mlp_in:
        lin = module(layer, name)
        e = el(lin.weight)
        s.mlp += e.sum(1).cpu()
        s.hidden += e.sum(0).cpu()
        if lin.bias is not None:
            s.mlp += el(lin.bias).cpu()
    down = el(module(layer, arch.mlp_out).weight)
    s.mlp += down.sum(0).cpu()
    s.hidden += down.sum(1).cpu()
    return s


def prunable_parameters(layer: torch.nn.Module, arch: Arch) -> list[torch.nn.Parameter]:
    params = []
    for name in (arch.q, arch.k, arch.v, arch.o, *arch.mlp_in, arch.mlp_out):
        lin = module(layer, name)
        params.append(lin.weight)
        if lin.bias is not None and name != arch.o and name != arch.mlp_out:
            params.append(lin.bias)
    return params


def _taylor_element(second_order: bool):
    def element(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        wg = (w * g).abs()
        return wg + 0.5 * wg * wg if second_order else wg

    return element


def gradient_scores(model: torch.nn.Module, arch: Arch, geo: Geometry, windows: torch.Tensor,
                    second_order: bool = False, progress: Progress = SILENT) -> tuple[list[LayerScores], float]:
    """Taylor scores from one forward/backward pass per calibration window; also the mean calibration loss."""
    layers = decoder_layers(model)
    device = model_device(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for layer in layers for p in prunable_parameters(layer, arch)}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    scores = [_zeros(geo) for _ in layers]
    element = _taylor_element(second_order)
    losses = []
    progress.start("Scoring structures (taylor2)" if second_order else "Scoring structures (taylor)",
                   total=len(windows))
    try:
        for w in windows:
            ids = w.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.float().backward()
            losses.append(loss.item())
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    step = _layer_scores(layer, arch, geo, element)
                    scores[i].q += step.q
                    scores[i].kv += step.kv
                    scores[i].mlp += step.mlp
                    scores[i].hidden += step.hidden
            for p in model.parameters():
                p.grad = None
            progress.advance(1, loss=sum(losses) / len(losses))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        progress.finish()
    return scores, sum(losses) / len(losses)


def weight_scores(model: torch.nn.Module, arch: Arch, geo: Geometry) -> list[LayerScores]:
    """Magnitude scores: the squared weights of each structure."""
    with torch.no_grad():
        return [_layer_scores(layer, arch, geo, lambda w, g: w * w) for layer in decoder_layers(model)]


def _block_cost(w: torch.Tensor, ginv: torch.Tensor, size: int) -> torch.Tensor:
    """Optimal Brain Surgeon cost of zeroing each block of `size` input columns of W and refitting the
    rest by least squares: trace(W_B [(G^-1)_BB]^-1 W_B^T), the increase of sum ||W x - W' x||^2."""
    n = w.shape[1] // size
    if size == 1:
        return (w * w).sum(0) / ginv.diagonal()
    cost = torch.empty(n, dtype=w.dtype)
    for b in range(n):
        s = slice(b * size, (b + 1) * size)
        wb = w[:, s]
        cost[b] = (wb @ torch.linalg.inv(ginv[s, s]) * wb).sum()
    return cost


def refit_scores(model: torch.nn.Module, arch: Arch, geo: Geometry, attn_grams: list[torch.Tensor],
                 mlp_grams: list[torch.Tensor], damp: float) -> list[LayerScores]:
    """What removing each structure costs the layer's output once the kept columns of o_proj / down_proj
    are refit on calibration data (what reconstruction then does). A structure whose contribution the
    others can reproduce scores low even when its weights or gradients are large; Taylor scores
    cannot see that. G = sum x x^T of the projection's input, damped as the refit damps it."""
    out = []
    with torch.no_grad():
        for layer, g_attn, g_mlp in zip(decoder_layers(model), attn_grams, mlp_grams):
            costs = []
            for lin, g, sizes in ((module(layer, arch.o), g_attn, (geo.head_dim, geo.head_dim * geo.q_per_group)),
                                  (module(layer, arch.mlp_out), g_mlp, (1,))):
                g = g.double().cpu()
                g = g + damp * g.diagonal().mean().clamp_min(1e-12) * torch.eye(g.shape[0], dtype=g.dtype)
                chol, info = torch.linalg.cholesky_ex(g)
                ginv = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.pinv(g, hermitian=True)
                w = lin.weight.detach().double().cpu()
                costs.extend(_block_cost(w, ginv, size) for size in sizes)
            q, group, mlp = (c.float() for c in costs)
            # a KV group's score is its own joint cost; LayerScores.group adds the q heads back
            kv = group - q.view(geo.kv_heads, geo.q_per_group).sum(1)
            out.append(LayerScores(q, kv, mlp))
    return out


def combine(a: list[LayerScores], b: list[LayerScores], geo: Geometry) -> list[LayerScores]:
    """Per structure, the product of two scores: high only when both call it important. Every layer
    keeps the same widths, so only the ranking inside a layer matters and the scales need no matching."""
    out = []
    for x, y in zip(a, b):
        q = x.q * y.q
        group = x.group(geo) * y.group(geo)
        out.append(LayerScores(q, group - q.view(geo.kv_heads, geo.q_per_group).sum(1), x.mlp * y.mlp,
                               x.hidden if x.hidden is not None else y.hidden))
    return out


def random_scores(geo: Geometry, seed: int) -> list[LayerScores]:
    gen = torch.Generator().manual_seed(seed)
    return [LayerScores(torch.rand(geo.heads, generator=gen), torch.rand(geo.kv_heads, generator=gen),
                        torch.rand(geo.intermediate, generator=gen)) for _ in range(geo.layers)]


def scores(method: str, model: torch.nn.Module, arch: Arch, geo: Geometry, windows: torch.Tensor | None,
           seed: int = 0, progress: Progress = SILENT) -> tuple[list[LayerScores], float | None]:
    """Scores of every structure by `method`; the mean calibration loss when a pass was made."""
    if method in NEEDS_GRADIENTS:
        return gradient_scores(model, arch, geo, windows, second_order=method == "taylor2", progress=progress)
    if method == "obs":   # computed from the calibration statistics by refit_scores
        return None, None
    if method == "l2":
        return weight_scores(model, arch, geo), None
    if method == "random":
        return random_scores(geo, seed), None
    raise ValueError(f"unknown importance method {method}")


def finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None
