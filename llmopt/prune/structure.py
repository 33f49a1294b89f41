"""Which modules of a decoder layer form coupled groups that must be removed together.

Width pruning removes three kinds of structure from every decoder layer, hidden size untouched:

- a query head: `head_dim` rows of q_proj and the matching `head_dim` columns of o_proj;
- a KV group: `head_dim` rows of k_proj and v_proj plus every query head that reads them;
- an MLP channel: one row of each input projection (gate and up, or the single fc1 of a
  non-gated MLP) and the matching column of the output projection.

Per-head norms (Gemma3 / Qwen3 q_norm, k_norm) act on `head_dim`, which pruning keeps, so they
are shared by all heads and stay as they are. A new architecture is one new `Arch` entry here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llmopt.errors import UserError


@dataclass(frozen=True)
class Arch:
    """Module names inside one decoder layer (relative to the layer)."""

    name: str
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    attn: str = "self_attn"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")   # rows removed together
    mlp_out: str = "mlp.down_proj"                                # columns removed with them
    head_norms: tuple[str, ...] = ()                              # per-head_dim norms, kept as they are
    attn_norm: str = "input_layernorm"            # the norm whose output q, k and v read
    mlp_norm: str = "post_attention_layernorm"    # the norm whose output the MLP inputs read
    norm_offset: float = 0.0          # RMSNorm multiplies by (offset + weight): Gemma's 1 + w
    scaled_embeddings: bool = False   # embeddings times sqrt(config.hidden_size) inside the model


_LLAMA = Arch("LLaMA")
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": Arch("Mistral"),
    "qwen2": Arch("Qwen2"),
    "qwen3": Arch("Qwen3", head_norms=_QK_NORM),
    "gemma2": Arch("Gemma2", norm_offset=1.0, scaled_embeddings=True, mlp_norm="pre_feedforward_layernorm"),
    "gemma3_text": Arch("Gemma3", head_norms=_QK_NORM, norm_offset=1.0, scaled_embeddings=True,
                        mlp_norm="pre_feedforward_layernorm"),
}

SUPPORTED = "Llama (incl. SmolLM), Mistral, Qwen2, Qwen3, Gemma2, Gemma3 (text)"


def arch_for(config: Any) -> Arch:
    """The description for a (text) config; UserError naming what is supported otherwise."""
    model_type = getattr(config, "model_type", None) if not isinstance(config, dict) else config.get("model_type")
    if model_type not in ARCHS:
        raise UserError(f"llmopt prune does not support model type '{model_type}'",
                        hint=f"supported: {SUPPORTED}")
    return ARCHS[model_type]


@dataclass(frozen=True)
class Geometry:
    """The widths a config describes, and what one structure of each kind costs in parameters."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    attention_bias: bool
    mlp_bias: bool
    mlp_inputs: int            # 2 for gated MLPs, 1 for fc1/fc2

    @property
    def q_per_group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_head_params(self) -> int:
        return 2 * self.hidden * self.head_dim + (self.head_dim if self.attention_bias else 0)

    @property
    def kv_head_params(self) -> int:
        return 2 * self.hidden * self.head_dim + (2 * self.head_dim if self.attention_bias else 0)

    @property
    def channel_params(self) -> int:
        return (self.mlp_inputs + 1) * self.hidden + (self.mlp_inputs if self.mlp_bias else 0)

    def layer_params(self, heads: int, kv_heads: int, intermediate: int) -> int:
        """Prunable parameters of one layer at these widths (norms and o/down biases excluded)."""
        return heads * self.q_head_params + kv_heads * self.kv_head_params + intermediate * self.channel_params


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def geometry(config: Any, arch: Arch) -> Geometry:
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Geometry(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=heads, kv_heads=kv,
                    head_dim=head_dim, intermediate=cfg.intermediate_size,
                    attention_bias=bool(getattr(cfg, "attention_bias", False)),
                    mlp_bias=bool(getattr(cfg, "mlp_bias", False)), mlp_inputs=len(arch.mlp_in))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers of a *ForCausalLM model."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}",
                        hint=f"supported: {SUPPORTED}")
    return layers


def module(layer: torch.nn.Module, name: str) -> torch.nn.Module:
    return layer.get_submodule(name)


# --------------------------------------------------------------------------- widths and budgets

@dataclass(frozen=True)
class Widths:
    """The widths every layer has after pruning."""

    heads: int
    kv_heads: int
    intermediate: int

    def describe(self) -> str:
        return f"{self.heads} heads / {self.kv_heads} KV heads, intermediate {self.intermediate}"


@dataclass(frozen=True)
class Candidate:
    widths: Widths
    removed: int            # parameters removed over all layers
    attention_removed: int  # the part of `removed` taken from attention


def candidates(geo: Geometry, budget: float, multiple_of: int, heads: bool = True,
               mlp: bool = True) -> list[Candidate]:
    """Every attention shape (whole KV groups and/or query heads per group removed, at least one of each
    left, `hidden % heads == 0` as transformers' configs require) whose cost fits the budget, with the
    MLP width that brings the total to `budget` parameters removed while keeping the MLP width a
    multiple of `multiple_of` (rounded down, so at least the budget is removed). `heads=False` keeps
    every head; `mlp=False` keeps the MLP, and then the cheapest attention shape that reaches the
    budget is the one option (as it is when no shape fits, e.g. when the hidden size rules out the
    others)."""
    per_layer = budget / geo.layers
    full = geo.layer_params(geo.heads, geo.kv_heads, geo.intermediate)
    out, over = [], []
    for kv in range(geo.kv_heads, 0, -1):
        for q in range(geo.q_per_group, 0, -1):
            if geo.hidden % (kv * q) or (not heads and (kv, q) != (geo.kv_heads, geo.q_per_group)):
                continue
            attn = full - geo.layer_params(kv * q, kv, geo.intermediate)
            left = per_layer - attn
            if left < 0 and attn > 0:
                over.append(Candidate(Widths(kv * q, kv, geo.intermediate), geo.layers * attn, geo.layers * attn))
                continue
            kept = geo.intermediate
            if left > 0:
                if not mlp:
                    continue
                kept = min(int(math.floor((geo.intermediate - left / geo.channel_params) / multiple_of + 1e-9))
                           * multiple_of, geo.intermediate)
                if kept < multiple_of:
                    continue
            widths = Widths(kv * q, kv, kept)
            removed = geo.layers * (full - geo.layer_params(widths.heads, kv, kept))
            out.append(Candidate(widths, removed, geo.layers * attn))
    return out or sorted(over, key=lambda c: c.removed)[:1]


def max_removable(geo: Geometry, multiple_of: int) -> int:
    """The most parameters width pruning can remove: one KV head with one query head, `multiple_of` channels."""
    full = geo.layer_params(geo.heads, geo.kv_heads, geo.intermediate)
    return geo.layers * (full - geo.layer_params(1, 1, min(multiple_of, geo.intermediate)))
