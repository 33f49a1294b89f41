"""Remove the chosen structures from the weights, rewrite the config, and optionally reconstruct.

Every layer keeps the same widths, because a standard config has one `num_attention_heads`, one
`num_key_value_heads` and one `intermediate_size` for all layers; which heads and channels each
layer keeps is still chosen from that layer's own scores. Query heads stay ordered by KV group,
so head i still reads KV head i // (heads / kv_heads) after slicing.

Reconstruction (least squares on calibration activations, as in FLAP / ZipLM): removing columns
of o_proj or down_proj changes the layer's output; the kept columns are refit so that the output
on calibration data stays as close as possible:  W_K' = W_K + W_R G_RK G_KK^-1,  where G = sum x x^T
of the projection's input over calibration tokens. G is one fp32 (in x in) matrix per projection
and layer: (heads*head_dim)^2 + intermediate^2 floats per layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from llmopt.models import model_device
from llmopt.progress import SILENT, Progress
from llmopt.prune.importance import LayerScores
from llmopt.prune.structure import Arch, Geometry, Widths, decoder_layers, module, text_config

RECONSTRUCT_DAMP = 0.01   # ridge term, as a fraction of the mean diagonal of G_KK


@dataclass
class Keep:
    """What one layer keeps, as sorted indices into its original structures."""

    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    channels: torch.Tensor


def choose(scores: list[LayerScores], geo: Geometry, widths: Widths) -> list[Keep]:
    """Per layer: the best KV groups, the best query heads inside each kept group, the best channels."""
    q_keep = widths.heads // widths.kv_heads
    keeps = []
    for s in scores:
        groups = torch.sort(torch.topk(s.group(geo), widths.kv_heads).indices).values
        heads = []
        for g in groups.tolist():
            inside = s.q[g * geo.q_per_group:(g + 1) * geo.q_per_group]
            best = torch.sort(torch.topk(inside, q_keep).indices).values
            heads.append(best + g * geo.q_per_group)
        channels = torch.sort(torch.topk(s.mlp, widths.intermediate).indices).values
        keeps.append(Keep(torch.cat(heads), groups, channels))
    return keeps


def _expand(blocks: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of whole blocks of `size` rows/columns (heads -> their head_dim rows)."""
    return (blocks.unsqueeze(1) * size + torch.arange(size)).reshape(-1)


# --------------------------------------------------------------------------- calibration statistics

class Grams:
    """sum x x^T of the inputs of o_proj and the MLP output projection of every layer (fp32)."""

    def __init__(self) -> None:
        self.attn: list[torch.Tensor | None] = []
        self.mlp: list[torch.Tensor | None] = []
        self.tokens = 0

    def subset(self, layers: list[int]) -> "Grams":
        """The statistics of these layers only (those a depth-pruned model keeps), in order."""
        out = Grams()
        out.attn, out.mlp, out.tokens = [self.attn[i] for i in layers], [self.mlp[i] for i in layers], self.tokens
        return out

    @contextmanager
    def capture(self, model: torch.nn.Module, arch: Arch) -> Iterator["Grams"]:
        layers = decoder_layers(model)
        self.attn = [None] * len(layers)
        self.mlp = [None] * len(layers)
        handles = []

        def hook(store: list, i: int, count: bool):
            def pre(_mod, args):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).float()
                with torch.no_grad():
                    g = x.T @ x
                    store[i] = g if store[i] is None else store[i].add_(g)
                if count:
                    self.tokens += x.shape[0]
            return pre

        for i, layer in enumerate(layers):
            handles.append(module(layer, arch.o).register_forward_pre_hook(hook(self.attn, i, i == 0)))
            handles.append(module(layer, arch.mlp_out).register_forward_pre_hook(hook(self.mlp, i, False)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def reconstruct(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                damp: float = RECONSTRUCT_DAMP) -> torch.Tensor:
    """The kept columns of `weight` refit by least squares so W[:, K] x_K best matches W x."""
    w = weight.float()
    keep = keep.to(w.device)
    mask = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    mask[keep] = False
    removed = mask.nonzero().squeeze(1)
    if removed.numel() == 0:
        return weight[:, keep].clone()
    g = gram.to(w.device)
    g_kk = g[keep][:, keep]
    diag = g_kk.diagonal()
    lam = damp * diag.mean().clamp_min(1e-8)
    g_kk = g_kk + lam * torch.eye(len(keep), device=w.device)
    g_kr = g[keep][:, removed]
    chol, info = torch.linalg.cholesky_ex(g_kk)
    if int(info) == 0:
        x = torch.cholesky_solve(g_kr, chol)
    else:  # pragma: no cover - damping makes G_KK positive definite in practice
        x = torch.linalg.lstsq(g_kk, g_kr).solution
    return (w[:, keep] + w[:, removed] @ x.T).to(weight.dtype)


# --------------------------------------------------------------------------- applying

def _slice_linear(lin: torch.nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  new_weight: torch.Tensor | None = None) -> None:
    w = lin.weight
    if new_weight is None:
        new_weight = w.data
        if rows is not None:
            new_weight = new_weight[rows.to(w.device)]
        if cols is not None:
            new_weight = new_weight[:, cols.to(w.device)]
    lin.weight = torch.nn.Parameter(new_weight.contiguous(), requires_grad=w.requires_grad)
    if lin.bias is not None and rows is not None:
        lin.bias = torch.nn.Parameter(lin.bias.data[rows.to(w.device)].contiguous(),
                                      requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = lin.weight.shape


def _slice_layer(layer: torch.nn.Module, arch: Arch, geo: Geometry, widths: Widths, keep: Keep,
                 o_weight: torch.Tensor | None = None, down_weight: torch.Tensor | None = None) -> None:
    """Slice one decoder layer to `widths` in place; o/down take the given (refit) weights if any."""
    d = geo.head_dim
    q_rows = _expand(keep.q_heads, d)
    kv_rows = _expand(keep.kv_heads, d)
    _slice_linear(module(layer, arch.q), rows=q_rows)
    _slice_linear(module(layer, arch.k), rows=kv_rows)
    _slice_linear(module(layer, arch.v), rows=kv_rows)
    _slice_linear(module(layer, arch.o), cols=q_rows, new_weight=o_weight)
    for name in arch.mlp_in:
        _slice_linear(module(layer, name), rows=keep.channels)
    _slice_linear(module(layer, arch.mlp_out), cols=keep.channels, new_weight=down_weight)
    attn = module(layer, arch.attn)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = widths.heads // widths.kv_heads
    for attr, value in (("num_heads", widths.heads), ("num_key_value_heads", widths.kv_heads)):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)
    mlp = module(layer, arch.mlp_out.rsplit(".", 1)[0]) if "." in arch.mlp_out else layer
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = widths.intermediate


def apply(model: torch.nn.Module, arch: Arch, geo: Geometry, widths: Widths, keeps: list[Keep],
          grams: Grams | None = None, progress: Progress = SILENT) -> None:
    """Slice every layer to `widths` in place (refitting o/down when `grams` is given); rewrite the config."""
    layers = decoder_layers(model)
    progress.start("Removing structures" + (" and reconstructing" if grams else ""), total=len(layers))
    with torch.no_grad():
        for i, (layer, keep) in enumerate(zip(layers, keeps)):
            o, down = module(layer, arch.o), module(layer, arch.mlp_out)
            o_w = reconstruct(o.weight.data, grams.attn[i], _expand(keep.q_heads, geo.head_dim)) \
                if grams and grams.attn[i] is not None else None
            down_w = reconstruct(down.weight.data, grams.mlp[i], keep.channels) \
                if grams and grams.mlp[i] is not None else None
            _slice_layer(layer, arch, geo, widths, keep, o_w, down_w)
            progress.advance(1)
    progress.finish()
    rewrite_config(model.config, geo, widths)


def rewrite_config(config, geo: Geometry, widths: Widths) -> None:
    """The standard config of the pruned model (head_dim written out, since heads no longer divide hidden)."""
    for cfg in {id(c): c for c in (config, text_config(config))}.values():
        if getattr(cfg, "num_attention_heads", None) is None:
            continue
        cfg.num_attention_heads = widths.heads
        cfg.num_key_value_heads = widths.kv_heads
        cfg.intermediate_size = widths.intermediate
        cfg.head_dim = geo.head_dim


@contextmanager
def masked(model: torch.nn.Module, arch: Arch, geo: Geometry, keeps: list[Keep],
           grams: Grams | None = None) -> Iterator[None]:
    """Behave as if pruned, without changing shapes: the removed columns of o/down are zeroed (and the
    kept ones refit when `grams` is given), which removes exactly the same structures. Restored after."""
    layers = decoder_layers(model)
    saved = []
    with torch.no_grad():
        for i, (layer, keep) in enumerate(zip(layers, keeps)):
            for lin, cols, gram in ((module(layer, arch.o), _expand(keep.q_heads, geo.head_dim),
                                     grams.attn[i] if grams else None),
                                    (module(layer, arch.mlp_out), keep.channels, grams.mlp[i] if grams else None)):
                saved.append((lin, lin.weight.data.clone()))
                kept = reconstruct(lin.weight.data, gram, cols) if gram is not None else lin.weight.data[:, cols]
                new = torch.zeros_like(lin.weight.data)
                new[:, cols.to(new.device)] = kept
                lin.weight.data.copy_(new)
    try:
        yield
    finally:
        with torch.no_grad():
            for lin, w in saved:
                lin.weight.data.copy_(w)


@torch.no_grad()
def calibration_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token loss over windows (each window on its own)."""
    device = model_device(model)
    total = 0.0
    for w in windows:
        ids = w.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:]).item()
    return total / len(windows)


@torch.no_grad()
def forward_all(model: torch.nn.Module, windows: torch.Tensor, progress: Progress = SILENT,
                description: str = "Calibration pass") -> float:
    """One no-grad pass over the calibration windows (to fill Grams); returns the mean loss."""
    device = model_device(model)
    progress.start(description, total=len(windows))
    total = 0.0
    for n, w in enumerate(windows, 1):
        ids = w.unsqueeze(0).to(device)
        total += model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        progress.advance(1, loss=total / n)
    progress.finish()
    return total / len(windows)
