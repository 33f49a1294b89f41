"""Depth pruning: remove whole decoder layers, chosen by the loss the model has without each one.

Importance is measured, not guessed: one pass over calibration windows per layer with that layer
bypassed (its input passed on as its output), compared with the unpruned loss. The layers whose
absence costs least go. The config is rewritten as the model's own with fewer layers: every
per-layer list (Gemma3's and Qwen2's `layer_types` sliding/full pattern) keeps the entries of the
layers kept, and the kept layers are renumbered for the KV cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from llmopt.progress import SILENT, Progress
from llmopt.prune.structure import decoder_layers, text_config


class _Bypass(torch.nn.Module):
    """Stands in for a decoder layer: returns the hidden states it was given."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextmanager
def bypassed(model: torch.nn.Module, index: int) -> Iterator[None]:
    """The model with layer `index` skipped, restored after."""
    layers = decoder_layers(model)
    saved = layers[index]
    layers[index] = _Bypass()
    try:
        yield
    finally:
        layers[index] = saved


def skip_losses(model: torch.nn.Module, windows: torch.Tensor, loss_fn, progress: Progress = SILENT) -> list[float]:
    """The calibration loss with each layer bypassed in turn (`loss_fn(model, windows)` measures it)."""
    n = len(decoder_layers(model))
    progress.start("Scoring layers (loss without each)", total=n)
    out = []
    for i in range(n):
        with bypassed(model, i):
            out.append(loss_fn(model, windows))
        progress.advance(1, loss=out[-1])
    progress.finish()
    return out


def drop_order(losses: list[float]) -> list[int]:
    """Layers from the least to the most missed."""
    return sorted(range(len(losses)), key=lambda i: losses[i])


def remove_layers(model: torch.nn.Module, drop: list[int]) -> None:
    """Delete the layers `drop` in place; rewrite num_hidden_layers and every per-layer config list."""
    layers = decoder_layers(model)
    n = len(layers)
    kept = [i for i in range(n) if i not in set(drop)]
    if len(kept) == n:
        return
    new = torch.nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(new):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    base = model.get_decoder()
    base.layers = new
    for cfg in {id(c): c for c in (model.config, text_config(model.config))}.values():
        if getattr(cfg, "num_hidden_layers", None) != n:
            continue
        for key, value in list(vars(cfg).items()):
            if isinstance(value, (list, tuple)) and len(value) == n and not key.startswith("_"):
                setattr(cfg, key, type(value)(value[i] for i in kept))
        cfg.num_hidden_layers = len(kept)
