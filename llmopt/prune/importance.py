"""Importance of every coupled structure (query head, KV group, MLP channel) of every layer.

- `taylor`: first-order Taylor, the element-wise |w * dL/dw| summed over the structure (LLM-Pruner's
  element-wise score), with the LM loss of one calibration window per step. Each step's |w * g| is
  reduced to per-structure sums in fp32 right after its backward pass, so memory is the model, the
  gradients of the prunable Linear weights (embeddings, norms and the LM head get none) and one
  window's activations; no per-sample or per-element accumulators are kept.
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

METHODS = ("taylor", "taylor2", "l2", "random")
NEEDS_GRADIENTS = ("taylor", "taylor2")


@dataclass
class LayerScores:
    """Higher = more important. kv holds the k/v rows only; group scores add their query heads."""

    q: torch.Tensor     # [heads]
    kv: torch.Tensor    # [kv_heads]
    mlp: torch.Tensor   # [intermediate]

    def group(self, geo: Geometry) -> torch.Tensor:
        """Score of removing a whole KV group: its k/v rows plus all the query heads that read them."""
        return self.kv + self.q.view(geo.kv_heads, geo.q_per_group).sum(1)


def _zeros(geo: Geometry) -> LayerScores:
    f = dict(dtype=torch.float32)
    return LayerScores(torch.zeros(geo.heads, **f), torch.zeros(geo.kv_heads, **f),
                       torch.zeros(geo.intermediate, **f))


def _rows(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum an element score over row blocks: [groups * n, ...] -> [groups]."""
    return t.reshape(groups, -1).sum(1)


def _cols(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum an element score over column blocks: [out, groups * n] -> [groups]."""
    return t.reshape(t.shape[0], groups, -1).sum((0, 2))


def _layer_scores(layer: torch.nn.Module, arch: Arch, geo: Geometry,
                  element: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> LayerScores:
    """Reduce an element-wise score of the layer's prunable weights to per-structure sums."""

    def el(p: torch.nn.Parameter | None) -> torch.Tensor | None:
        if p is None:
            return None
        return element(p.detach().float(), None if p.grad is None else p.grad.float())

    s = _zeros(geo)
    q, o = module(layer, arch.q), module(layer, arch.o)
    s.q += _rows(el(q.weight), geo.heads).cpu() + _cols(el(o.weight), geo.heads).cpu()
    if q.bias is not None:
        s.q += _rows(el(q.bias), geo.heads).cpu()
    for name in (arch.k, arch.v):
        lin = module(layer, name)
        s.kv += _rows(el(lin.weight), geo.kv_heads).cpu()
        if lin.bias is not None:
            s.kv += _rows(el(lin.bias), geo.kv_heads).cpu()
    for name in arch.mlp_in:
        lin = module(layer, name)
        s.mlp += el(lin.weight).sum(1).cpu()
        if lin.bias is not None:
            s.mlp += el(lin.bias).cpu()
    s.mlp += el(module(layer, arch.mlp_out).weight).sum(0).cpu()
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


def random_scores(geo: Geometry, seed: int) -> list[LayerScores]:
    gen = torch.Generator().manual_seed(seed)
    return [LayerScores(torch.rand(geo.heads, generator=gen), torch.rand(geo.kv_heads, generator=gen),
                        torch.rand(geo.intermediate, generator=gen)) for _ in range(geo.layers)]


def scores(method: str, model: torch.nn.Module, arch: Arch, geo: Geometry, windows: torch.Tensor | None,
           seed: int = 0, progress: Progress = SILENT) -> tuple[list[LayerScores], float | None]:
    """Scores of every structure by `method`; the mean calibration loss when a pass was made."""
    if method in NEEDS_GRADIENTS:
        return gradient_scores(model, arch, geo, windows, second_order=method == "taylor2", progress=progress)
    if method == "l2":
        return weight_scores(model, arch, geo), None
    if method == "random":
        return random_scores(geo, seed), None
    raise ValueError(f"unknown importance method {method}")


def finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None
