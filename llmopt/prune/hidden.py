"""Hidden-size pruning: the same residual-stream channels leave every module that touches them.

One channel of the residual stream is a column of the embedding (and of an untied output head), a
column of every projection that reads the stream (q, k, v, the MLP inputs), a row of every
projection that writes it (o, the MLP output, with their biases) and one weight of every norm over
it (input, post-attention, pre/post-feedforward, final). Tied embeddings stay one tensor.

Importance: `HiddenStats.scores` is Minitron's activation score, the mean |output| of every
hidden-size norm on calibration tokens summed over the norms; the Taylor score of a channel comes
from the gradient pass (`importance.LayerScores.hidden`). The plan search measures which of the two
to use at each hidden size.

The projections that read the stream (q, k, v, the MLP inputs) are refit by least squares when a
Gram of their input was measured (`--reconstruct`): the removed channels are largely linear in the
kept ones, so W_K' = W_K + W_R G_RK G_KK^-1 keeps most of what they contributed (measured on
Gemma3-270M at hidden 576 of 640: held-out loss 5.21 -> 4.55; benchmarks/prune_hidden.py).

Two things change the computation besides the removed channels, and both are compensated:

- RMSNorm divides by the root mean square over the channels it sees. Over fewer channels that mean
  changes, so each norm's weight is scaled by sqrt(h/h' * E[S_kept/S]), S being a token's sum of
  squares at the norm's input, measured on calibration tokens: the kept outputs keep their size.
- Gemma multiplies the embedding by sqrt(hidden_size), computed from the config; the embedding
  weights are scaled by sqrt(h/h') so the stream starts where it did, and with tied embeddings the
  final norm by the inverse, so the logits stay as they were.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from llmopt.prune.slicing import reconstruct
from llmopt.prune.structure import Arch, decoder_layers, module, text_config


def hidden_norms(model: torch.nn.Module, arch: Arch) -> dict[str, torch.nn.Module]:
    """Every norm over the residual stream, by full module name (per-head q/k norms excluded)."""
    h = text_config(model.config).hidden_size
    heads = {n.rsplit(".", 1)[-1] for n in arch.head_norms}
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if "norm" in type(mod).__name__.lower() and isinstance(w, torch.Tensor) and tuple(w.shape) == (h,) \
                and name.rsplit(".", 1)[-1] not in heads:
            out[name] = mod
    return out


def norms_per_layer(model: torch.nn.Module, arch: Arch) -> int:
    """How many hidden-size norms one decoder layer has."""
    layer = decoder_layers(model)[0]
    return sum(1 for m in layer.modules() if any(m is n for n in hidden_norms(model, arch).values()))


def _reader_norms(model: torch.nn.Module, arch: Arch) -> set[int]:
    """ids of the norms whose outputs feed projections (the refit needs their output Grams)."""
    return {id(module(layer, n)) for layer in decoder_layers(model) for n in (arch.attn_norm, arch.mlp_norm)}


class HiddenStats:
    """Per channel: the summed mean |output| of the hidden-size norms (importance), per norm the mean
    share of a token's sum of squares each channel holds at the norm's input (compensation), and with
    `grams` the Gram matrix of each projection-feeding norm's output (the refit)."""

    def __init__(self, grams: bool = False) -> None:
        self.energy: dict[str, torch.Tensor] = {}
        self.abs_out: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] | None = {} if grams else None
        self.tokens = 0

    @contextmanager
    def capture(self, model: torch.nn.Module, arch: Arch) -> Iterator["HiddenStats"]:
        norms = hidden_norms(model, arch)
        first = next(iter(norms))
        readers = _reader_norms(model, arch) if self.grams is not None else set()

        def hook(name: str, gram: bool):
            def fn(_mod, args, output):
                with torch.no_grad():
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    sq = x * x
                    share = (sq / sq.sum(-1, keepdim=True).clamp_min(1e-30)).sum(0).cpu()
                    o = output.detach().reshape(-1, output.shape[-1]).float()
                    y = o.abs().sum(0).cpu()
                    self.energy[name] = share if name not in self.energy else self.energy[name] + share
                    self.abs_out[name] = y if name not in self.abs_out else self.abs_out[name] + y
                    if gram:
                        g = (o.T @ o).cpu()
                        self.grams[name] = g if name not in self.grams else self.grams[name] + g
                    if name == first:
                        self.tokens += x.shape[0]
            return fn

        handles = [m.register_forward_hook(hook(n, id(m) in readers)) for n, m in norms.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def scores(self) -> torch.Tensor:
        """Channel importance: sum over norms of the mean |output|."""
        return torch.stack([v / max(self.tokens, 1) for v in self.abs_out.values()]).sum(0)

    def compensation(self, name: str, keep: torch.Tensor, hidden: int) -> float:
        """sqrt(h / h' * E[S_kept / S]) for the norm `name`: what keeps its kept outputs their size."""
        if len(keep) == hidden:
            return 1.0
        kept = (self.energy[name][keep].sum() / max(self.tokens, 1)).item()
        return math.sqrt(hidden / len(keep) * kept)


def keep_channels(scores: torch.Tensor, hidden: int) -> torch.Tensor:
    """The `hidden` best channels, in their original order."""
    return torch.sort(torch.topk(scores, hidden).indices).values


def _slice(lin: torch.nn.Linear, keep: torch.Tensor, rows: bool, gram: torch.Tensor | None = None) -> None:
    """Keep rows or columns `keep`; columns with a Gram of the input are refit by least squares."""
    w = lin.weight
    keep = keep.to(w.device)
    if gram is not None:
        new = reconstruct(w.data, gram, keep)
    else:
        new = w.data[keep] if rows else w.data[:, keep]
    lin.weight = torch.nn.Parameter(new.contiguous(), requires_grad=w.requires_grad)
    if rows and lin.bias is not None:
        lin.bias = torch.nn.Parameter(lin.bias.data[keep].contiguous(), requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = lin.weight.shape


def _scale_norm(norm: torch.nn.Module, keep: torch.Tensor, factor: float, offset: float) -> None:
    w = norm.weight
    new = (w.data[keep.to(w.device)].float() + offset) * factor - offset
    norm.weight = torch.nn.Parameter(new.to(w.dtype).contiguous(), requires_grad=w.requires_grad)


@torch.no_grad()
def apply(model: torch.nn.Module, arch: Arch, keep: torch.Tensor, stats: HiddenStats | None) -> None:
    """Keep only the `keep` residual channels everywhere, in place, and write the new hidden_size.
    `stats` gives the norm compensation and, with Grams, the refit (None: neither, a plain slice)."""
    cfg = text_config(model.config)
    h, h2 = cfg.hidden_size, len(keep)
    if h2 == h:
        return
    norms = hidden_norms(model, arch)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    scale = math.sqrt(h / h2) if arch.scaled_embeddings else 1.0
    final = getattr(model.get_decoder(), "norm", None)
    for name, norm in norms.items():
        factor = stats.compensation(name, keep, h) if stats is not None else 1.0
        _scale_norm(norm, keep, factor / (scale if tied and norm is final else 1.0), arch.norm_offset)
    new = emb.weight.data[:, keep.to(emb.weight.device)] * scale
    emb.weight = torch.nn.Parameter(new.contiguous(), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = h2
    if hasattr(emb, "scalar_embed_scale"):                      # Gemma: sqrt(hidden_size), recomputed on load
        emb.scalar_embed_scale = h2 ** 0.5
        emb.embed_scale.fill_(h2 ** 0.5)
    if tied:
        head.weight = emb.weight
        head.in_features = h2
    elif head is not None:
        _slice(head, keep, rows=False)
    name_of = {id(m): n for n, m in norms.items()}
    grams = (stats.grams if stats is not None else None) or {}
    for layer in decoder_layers(model):
        for norm, names in ((arch.attn_norm, (arch.q, arch.k, arch.v)), (arch.mlp_norm, arch.mlp_in)):
            gram = grams.get(name_of[id(module(layer, norm))])
            for name in names:
                _slice(module(layer, name), keep, rows=False, gram=gram)
        for name in (arch.o, arch.mlp_out):
            _slice(module(layer, name), keep, rows=True)
    for c in {id(c): c for c in (model.config, cfg)}.values():
        if getattr(c, "hidden_size", None) is not None:
            c.hidden_size = h2
