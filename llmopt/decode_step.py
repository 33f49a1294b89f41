"""One decode step of a LLaMA-family or Gemma3 model without transformers' per-call machinery (`serve_decode`).

At batch 1 a small model's step is a few hundred tiny calls, and what transformers wraps around them
(keyword deprecation, output capture, per-layer and per-module dispatch, sibling bookkeeping) took
2-8 ms of each token of SmolLM2-135M on a 2-core CPU, 10-18% of its 4-bit step and 3-10% of the float32
original's (`benchmarks/decode_step.py`, docs/runtime.md). For one new token of one sequence over
llmopt's growing cache, `step` calls the model's own modules for everything that holds weights (the
embedding, norms, projections, MLP, head), and writes out only the glue: the rotary rotation, the cache
write, the residual sums. The logits are the model's own
forward's, bit for bit (tests/test_decode_step.py): masks, rotary tables and attention are the model's
own functions. LLaMA-family layers (Llama, Qwen2, Mistral without a sliding window) and Gemma3's are
served; every other call, and every other model, runs the model's own forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmopt.kv_cache import GrowingLayer, SlidingLayer
from llmopt.quantize.fusion import outputs

_ATTENTION = ("sdpa", "llmopt_sdpa")      # attention implementations served (their arithmetic is unchanged)
_SERVED = "_llmopt_decode_step"
_KEYWORDS = {"input_ids", "cache", "past_key_values", "use_cache", "attention_mask", "position_ids",
             "cache_position", "logits_to_keep", "return_dict", "output_attentions", "output_hidden_states"}
_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")
# the output's cache field: `cache` in newer transformers 5.x, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def supported(model: torch.nn.Module) -> bool:
    """Whether `step` computes this model's forward: a CPU causal LM whose layers are all of one family
    `LAYERS` knows, with no logit soft-capping; sliding windows only where the family has them (Gemma3)."""
    config, inner = getattr(model, "config", None), getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if config is None or not layers or not hasattr(model, "lm_head") or model.training:
        return False
    family = type(layers[0]).__name__
    if family not in LAYERS or any(type(layer).__name__ != family for layer in layers):
        return False
    if config._attn_implementation not in _ATTENTION or len(layers) != config.num_hidden_layers:
        return False
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "attn_logit_softcapping",
                                               "use_bidirectional_attention")):
        return False
    windows = getattr(config, "sliding_window", None) is not None or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or ())
    if windows and family != "Gemma3DecoderLayer":
        return False
    if not all(hasattr(layer.mlp, n) for layer in layers for n in _MLP):
        return False
    try:
        return next(model.parameters()).device.type == "cpu" and all(
            hasattr(inner, n) for n in ("embed_tokens", "norm", "rotary_emb"))
    except StopIteration:
        return False


def serve_decode(model: torch.nn.Module) -> bool:
    """Route the model's one-token decode calls over llmopt's growing cache to `step` (the model object's
    own forward, not its class's: nothing saved changes); True when the model is served so."""
    if getattr(model, _SERVED, False):
        return True
    if not supported(model):
        return False
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        cache = None if args or torch.compiler.is_compiling() else _one_token_step(kwargs)
        if cache is None:
            return original(*args, **kwargs)
        logits = step(model, kwargs["input_ids"], cache, kwargs.get("attention_mask"))
        return _output(logits, cache)

    model.forward = forward
    setattr(model, _SERVED, True)
    return True


def _output(logits: torch.Tensor, cache: DynamicCache) -> CausalLMOutputWithPast:
    """transformers' causal-LM output, the cache under the field name this version uses."""
    return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache})


def _one_token_step(kwargs: dict) -> DynamicCache | None:
    """The llmopt cache of a call `step` computes exactly: one token of one sequence after a filled cache,
    without gradients, nothing asked for but the logits, positions and mask (if given) those of the next
    token; else None."""
    if not set(kwargs) <= _KEYWORDS or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
        return None
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or torch.is_grad_enabled():
        return None
    ids, cache = kwargs.get("input_ids"), kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(ids, torch.Tensor) or ids.shape != (1, 1) or not isinstance(cache, DynamicCache):
        return None
    if not cache.layers or not all(type(layer) in (GrowingLayer, SlidingLayer) and layer.is_initialized
                                   for layer in cache.layers):
        return None
    n = cache.get_seq_length()
    if n == 0 or kwargs.get("logits_to_keep", 0) not in (0, 1):
        return None
    mask, positions, slots = kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("cache_position")
    if mask is not None and (mask.shape != (1, n + 1) or not bool(mask.all())):
        return None
    for given in (positions, slots):
        if given is not None and (given.numel() != 1 or int(given) != n):
            return None
    return cache


def step(model: torch.nn.Module, token: torch.Tensor, cache: DynamicCache,
         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [1, 1, vocab] of `token` ([1, 1]) after the `cache`d tokens, which it appends to the cache.
    Masks and rotary tables come from the model's own functions, built before the cache grows, as its
    forward builds them; attention is the model's attention function."""
    inner, config = model.model, model.config
    h = inner.embed_tokens(token)
    position = torch.tensor([[cache.get_seq_length()]], device=h.device)
    masks = {"full_attention": create_causal_mask(config, h, attention_mask, cache, position)}
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(config, h, attention_mask, cache, position)
    family = type(inner.layers[0]).__name__
    rotary = {t: _rotary(inner.rotary_emb, h, position, t, family) for t in types}
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, None)
    layer_step = LAYERS[family]
    for layer, cached in zip(inner.layers, cache.layers):
        kind = getattr(layer.self_attn, "layer_type", None) or "full_attention"
        h = layer_step(layer, h, rotary[kind], masks[kind], cached, attend)
    return model.lm_head(inner.norm(h))


def _rotary(table: torch.nn.Module, h: torch.Tensor, position: torch.Tensor, kind: str, family: str):
    """(cos, sin) for one token, shaped to broadcast over [1, heads, 1, head_dim]."""
    cos, sin = table(h, position, kind) if family == "Gemma3DecoderLayer" else table(h, position)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def _rotate(q: torch.Tensor, k: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary embedding of q and k, both in one set of element-wise calls."""
    cos, sin = rotary
    heads, half = q.shape[1], q.shape[-1] // 2
    qk = torch.cat([q, k], dim=1)
    qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
    return qk[:, :heads], qk[:, heads:]


def _attention(attn: torch.nn.Module, x: torch.Tensor, rotary, mask, cached, attend: Callable,
               qk_norms: bool = False) -> torch.Tensor:
    """The attention block for one token, before the output projection: [1, 1, heads * head_dim]."""
    dim = attn.head_dim
    q, k, v = (y.view(1, 1, -1, dim).transpose(1, 2) for y in outputs((attn.q_proj, attn.k_proj, attn.v_proj), x))
    if qk_norms:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rotate(q, k, rotary)
    keys, values = cached.update(k, v)
    out, _ = attend(attn, q, keys, values, mask, dropout=0.0, scaling=attn.scaling,
                    sliding_window=getattr(attn, "sliding_window", None))
    return out.reshape(1, 1, -1)


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = outputs((mlp.gate_proj, mlp.up_proj), x)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _llama_layer(layer, h, rotary, mask, cached, attend) -> torch.Tensor:
    """LLaMA's decoder layer for one token: the same operations on the same values as its forward."""
    attn = layer.self_attn
    h = h + attn.o_proj(_attention(attn, layer.input_layernorm(h), rotary, mask, cached, attend))
    return h + _mlp(layer.mlp, layer.post_attention_layernorm(h))


def _gemma3_layer(layer, h, rotary, mask, cached, attend) -> torch.Tensor:
    """Gemma3's decoder layer for one token: q/k norms, and norms after attention and around the MLP."""
    attn = layer.self_attn
    out = attn.o_proj(_attention(attn, layer.input_layernorm(h), rotary, mask, cached, attend, qk_norms=True))
    h = h + layer.post_attention_layernorm(out)
    return h + layer.post_feedforward_layernorm(_mlp(layer.mlp, layer.pre_feedforward_layernorm(h)))


# decoder layers whose forward `step` computes, by class name
LAYERS: dict[str, Callable] = {"LlamaDecoderLayer": _llama_layer, "Qwen2DecoderLayer": _llama_layer,
                               "MistralDecoderLayer": _llama_layer, "Gemma3DecoderLayer": _gemma3_layer}
